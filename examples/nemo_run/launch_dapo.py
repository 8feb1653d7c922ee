"""Launch DAPO with NeMo-Run: on this machine (``--executor local``, torchrun) or on a Slurm cluster
(``--executor slurm``, an ``sbatch`` job with one torchrun per node).

    python examples/nemo_run/launch_dapo.py --executor local --nproc-per-node 2 \\
        --config examples/configs/toy_cpu.yaml trainer.max_steps=3
    python examples/nemo_run/launch_dapo.py --executor slurm --dryrun --config examples/configs/qwen2.5_32b_dapo.yaml
    python examples/nemo_run/launch_dapo.py --executor slurm --account ACCOUNT --partition PARTITION \\
        --config examples/configs/qwen2.5_32b_dapo.yaml [--container-image IMAGE --container-mounts A:B,...]

Slurm defaults are the H800 layout of the 32B config: 16 nodes × 8 GPUs, one torchrun per node with 8
processes. Account, partition, container image and mounts come from the flags or from SLURM_ACCOUNT,
SLURM_PARTITION, CONTAINER_IMAGE, CONTAINER_MOUNTS. The job sources slurm/env.sh (NCCL/CUDA settings); a failed
run requeues itself up to ``--retries`` times and resumes from its latest checkpoint (``trainer.resume``).
The repository must be on a file system the nodes share: the job runs it in place (no packaging).
Stopping at a step boundary on the scheduler's warning signal is the sbatch template's (slurm/README.md).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--executor", choices=["local", "slurm"], required=True)
    parser.add_argument("--config", required=True, help="YAML config (examples/configs/)")
    parser.add_argument("--dryrun", action="store_true", help="print what would run (the sbatch script), run nothing")
    parser.add_argument("--nproc-per-node", type=int, default=None, help="local: processes (default 2); slurm: = --gpus-per-node")
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--account", default=os.environ.get("SLURM_ACCOUNT"))
    parser.add_argument("--partition", default=os.environ.get("SLURM_PARTITION"))
    parser.add_argument("--container-image", default=os.environ.get("CONTAINER_IMAGE"))
    parser.add_argument("--container-mounts", default=os.environ.get("CONTAINER_MOUNTS"), help="comma-separated src:dst")
    parser.add_argument("--time", default="48:00:00")
    parser.add_argument("--retries", type=int, default=3, help="slurm: requeues after a failure (resumed from checkpoints)")
    parser.add_argument(
        "--max-restarts", type=int, default=2,
        help="torchrun restarts of the workers inside the job after a crash, each resumed from the last checkpoint",
    )
    parser.add_argument("--wait", action="store_true", help="slurm: wait for the job to end (polls squeue)")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="config overrides key.sub=value")
    return parser


def _executor(args: argparse.Namespace, config: str):
    """Slurm: no NeMo-Run launcher but slurm/node.sh on each node, the sbatch template's launch line. NeMo-Run's
    torchrun launcher (nemo_run 0.11.1 run/torchx_backend/components/torchrun.py:126-175) writes
    ``--node-rank $SLURM_NODEID`` into the batch script, where the batch shell expands it (0 on every node), and
    has no way to pass ``--rdzv-conf is_host`` or ``--local-addr``, so torchrun's guess of the rendezvous host
    fails as slurm/node.sh explains."""
    import nemo_run as run

    if args.executor == "local":
        # NeMo-Run 0.11.1's Torchrun launcher has no max_restarts (nemo_run/core/execution/launcher.py:64) and builds
        # torchrun's command itself; torchrun reads every option from PET_<OPTION> as well (torch/distributed/run.py:491,
        # argparse_util.env)
        restarts = {"PET_MAX_RESTARTS": str(args.max_restarts)}
        return run.LocalExecutor(ntasks_per_node=args.nproc_per_node or 2, launcher="torchrun", env_vars=restarts)
    if not args.account:  # NeMo-Run names the job after it
        raise SystemExit("launch_dapo.py: --executor slurm needs --account (or SLURM_ACCOUNT)")
    home = Path(os.environ.get("NEMORUN_HOME", Path.home() / ".nemo_run"))
    return run.SlurmExecutor(
        account=args.account,
        partition=args.partition,
        nodes=args.nodes,
        ntasks_per_node=1,  # slurm/node.sh on each node starts torchrun's processes
        gpus_per_node=args.gpus_per_node,
        env_vars={  # what slurm/node.sh reads (it passes MAX_RESTARTS to torchrun)
            "CONFIG": config, "NPROC_PER_NODE": str(args.nproc_per_node or args.gpus_per_node),
            "MAX_RESTARTS": str(args.max_restarts),
        },
        container_image=args.container_image,
        container_mounts=args.container_mounts.split(",") if args.container_mounts else [],
        time=args.time,
        tunnel=run.LocalTunnel(job_dir=str(home / "experiments")),
        packager=run.Packager(),  # the repository runs in place; no git archive of committed code
        retries=args.retries,
        # The batch shell (on the head node) sets what slurm/node.sh reads, as slurm/launch.sh does; NeMo-Run's own
        # head_node_ip comes from `hostname --ip-address` (127.0.1.1 on Debian hosts) and is not used.
        setup_lines=f"source {REPO}/slurm/head_address.sh\n"
        'export HEAD_ADDR="${HEAD_ADDR:-$(head_address "$head_node")}"\n'
        'export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}"\n'
        f"source {REPO}/slurm/env.sh",
        additional_parameters={"exclusive": True},
    )


def _wait_for_slurm(job_id: str) -> int:
    """NeMo-Run's own wait polls ``sacct``, which needs slurmdbd; ``squeue``/``scontrol`` work everywhere."""
    while subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip():
        time.sleep(2)
    shown = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).stdout
    fields = dict(item.split("=", 1) for item in shown.split() if "=" in item)
    print(f"slurm job {job_id}: {fields.get('JobState')} exit {fields.get('ExitCode')} restarts {fields.get('Restarts')}")
    return 0 if fields.get("JobState") == "COMPLETED" and fields.get("ExitCode") == "0:0" else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import nemo_run as run

    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # torchrun
    config = str(Path(args.config).resolve())
    # python -m: running megatron_dapo/__main__.py by path would put the package folder first on sys.path
    if args.executor == "local":
        script = run.Script(path="megatron_dapo", m=True, entrypoint="python", args=["train", "--config", config, *args.overrides])
    else:  # node.sh reads CONFIG from the executor's environment
        script = run.Script(path=str(REPO / "slurm" / "node.sh"), entrypoint="bash", args=list(args.overrides))
    with run.Experiment(f"dapo-{Path(args.config).stem}", executor=_executor(args, config), log_level="WARNING") as experiment:
        experiment.add(script, name="dapo", tail_logs=False)
        if args.dryrun:
            experiment.dryrun(log=True)
            return 0
        experiment.run(detach=args.executor == "slurm")
    job = experiment.jobs[0]
    if args.executor == "local":
        print(f"local job: {job.state} (logs under {job.executor.job_dir})")
        return 0 if str(job.state).endswith("SUCCEEDED") else 1
    job_id = job.handle.rstrip("/").split("/")[-1]
    print(f"submitted slurm job {job_id} (logs under {job.executor.job_dir})")
    return _wait_for_slurm(job_id) if args.wait else 0


if __name__ == "__main__":
    sys.exit(main())
