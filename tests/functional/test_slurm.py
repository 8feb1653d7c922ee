"""The launchers, run for real on a one-node Slurm on this machine (munge, slurmctld and slurmd from Debian's
packages, scripts/local_slurm.sh): the CPU form of ``sbatch slurm/dapo_32b.sbatch``, a job stopped by the
time-limit signal that requeues itself and resumes to the uninterrupted run's metrics, and NeMo-Run's Slurm
executor. When the cluster cannot be brought up (not root, no packages and no package index), the tests say why
they skip.

The multi-node launch lines without Slurm: two torchrun agents ("nodes") started by slurm/node.sh inside a network
namespace of the test's own, whose head address (192.0.2.77, a documentation address on an interface of that
namespace) is not what the host name resolves to, as on a cluster with GLOO_SOCKET_IFNAME or Debian's 127.0.1.1;
slurm/env.sh's interface derivation there; launch.sh's check of pyxis CONTAINER_MOUNTS. Tests send traffic only
inside that namespace."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..helpers import ROOT, TOY_CONFIG

pytestmark = pytest.mark.slow

TOY = ["data.toy_num_val=8", "rollout.val_n=2", "algorithm.max_num_gen_batches=0", "trainer.export_hf=false",
       "logging.progress_bar=false"]
OWN_WARM_START = "toy_model.sft_steps=300"  # the requeue test: the signal lands while the run builds it


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node Slurm cluster for this module; the environment its client commands need."""
    if os.geteuid() != 0:
        pytest.skip("a local Slurm needs root (munged and slurmd run as root here)")
    if shutil.which("slurmctld") is None:
        if shutil.which("apt-get") is None:
            pytest.skip("no Slurm installed and no apt-get to install it")
        installed = subprocess.run(["bash", "scripts/local_slurm.sh", "install"], cwd=ROOT, capture_output=True, text=True)
        if installed.returncode:
            pytest.skip(f"could not install Slurm from the package index: {installed.stderr.strip()[-300:]}")
    root = tmp_path_factory.mktemp("slurm")
    up = subprocess.run(["bash", "scripts/local_slurm.sh", "up", str(root)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    if up.returncode:
        pytest.skip(f"the local Slurm did not come up: {(up.stdout + up.stderr).strip()[-500:]}")
    env = dict(os.environ, SLURM_CONF=str(root / "etc" / "slurm.conf"), LOG_DIR=str(root / "logs"))
    yield env
    subprocess.run(["bash", "scripts/local_slurm.sh", "down", str(root)], cwd=ROOT, capture_output=True, timeout=120)


def _job_fields(job_id: str, env: dict) -> dict[str, str]:
    shown = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, env=env).stdout
    return dict(item.split("=", 1) for item in shown.split() if "=" in item)


def _wait_until_done(job_id: str, env: dict, timeout: float = 1500) -> dict[str, str]:
    """Slurm without accounting: poll squeue until the job leaves the queue, then read scontrol's record."""
    deadline = time.monotonic() + timeout
    while subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True, env=env).stdout.strip():
        assert time.monotonic() < deadline, f"job {job_id} still queued after {timeout} s"
        time.sleep(2)
    return _job_fields(job_id, env)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _sbatch(env: dict, tmp: Path, *args: str, wait: bool = True, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    command = ["sbatch", *(["--wait"] if wait else ["--parsable"]), "--nodes=1", "--gpus-per-node=0",
               f"--output={tmp}/slurm-%j.out", "slurm/dapo_32b.sbatch", *args]
    job_env = dict(env, CONFIG="examples/configs/toy_cpu.yaml", NPROC_PER_NODE="2", **(extra_env or {}))
    return subprocess.run(command, cwd=ROOT, env=job_env, capture_output=True, text=True, timeout=1800)


def test_the_32b_template_runs_the_toy_on_a_cpu_slurm(slurm, tmp_path, toy_warm_start):
    """The README's command, as written (plus the log and output locations of a test, and a warm-started toy)."""
    out = tmp_path / "run"
    result = _sbatch(slurm, tmp_path, "trainer.max_steps=3", *TOY, toy_warm_start, f"trainer.output_dir={out}")
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = result.stdout.strip().split()[-1]
    assert [row["step"] for row in _rows(out)] == [0, 1, 2, 3]  # step 0: the evaluation before training
    log = (Path(slurm["LOG_DIR"]) / job_id / "restart-0.log").read_text()
    assert "eval accuracy: before=" in log and "rendezvous" in log


def test_a_signalled_job_requeues_and_resumes_to_the_uninterrupted_metrics(slurm, tmp_path):
    args = ["trainer.max_steps=5", "trainer.save_interval=1", "trainer.keep_last=2", *TOY, OWN_WARM_START]
    whole = tmp_path / "whole"
    assert _sbatch(slurm, tmp_path, *args, f"trainer.output_dir={whole}").returncode == 0
    split = tmp_path / "split"
    submitted = _sbatch(slurm, tmp_path, *args, f"trainer.output_dir={split}", wait=False)
    job_id = submitted.stdout.strip().split(";")[0]
    log = Path(slurm["LOG_DIR"]) / job_id / "restart-0.log"
    deadline = time.monotonic() + 300
    while not (log.exists() and f"job {job_id} run 0:" in log.read_text()):  # the job's shell is running
        assert time.monotonic() < deadline and _job_fields(job_id, slurm).get("JobState") in ("PENDING", "RUNNING"), \
            _job_fields(job_id, slurm)
        time.sleep(0.5)
    # what Slurm sends before the time limit (--signal=B:USR1@600), here at once: it lands while the run starts
    # up (the warm start takes seconds), so the run stops at its first step boundary, not by a race with the steps
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=slurm, check=True)
    fields = _wait_until_done(job_id, slurm)
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", fields
    logs = Path(slurm["LOG_DIR"]) / job_id
    assert "preempted: stopped after step 1 (stop file)" in (logs / "restart-0.log").read_text()
    assert (logs / "requeue-after-restart-0").exists() and "eval accuracy" in (logs / "restart-1.log").read_text()
    expected, resumed = _rows(whole), _rows(split)
    assert [row["step"] for row in resumed] == [0, 1, 2, 3, 4, 5]  # each step once, none lost, none repeated
    for got, want in zip(resumed[1:], expected[1:]):
        for key in ("acc/mean", "actor/pg_loss", "actor/grad_norm", "actor/lr", "entropy/mean"):
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), (got["step"], key)
    assert sorted(p.name for p in (split / "checkpoints").glob("iter_*")) == ["iter_0000004", "iter_0000005"]  # keep_last


def test_nemo_run_submits_the_toy_to_slurm(slurm, tmp_path, toy_warm_start):
    pytest.importorskip("nemo_run")
    out = tmp_path / "run"
    env = dict(slurm, NEMORUN_HOME=str(tmp_path / "nemo-home"))
    command = [sys.executable, "examples/nemo_run/launch_dapo.py", "--executor", "slurm", "--nodes", "1",
               "--gpus-per-node", "0", "--nproc-per-node", "2", "--account", "local", "--partition", "debug", "--time", "00:30:00",
               "--retries", "0", "--wait", "--config", "examples/configs/toy_cpu.yaml", "trainer.max_steps=2",
               f"trainer.output_dir={out}", *TOY, toy_warm_start]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "COMPLETED exit 0:0" in result.stdout
    assert [row["step"] for row in _rows(out)] == [0, 1, 2]


HEAD = "192.0.2.77"  # TEST-NET-1: only ever on the namespace's own interface d0
# A veth pair (d0, d1): this kernel may lack the dummy interface type.
NAMESPACE = f"""ip link set lo up && ip link add d0 type veth peer name d1 && ip addr add {HEAD}/24 dev d0 \\
  && ip link set d1 up && ip link set d0 up || exit 90
"""


def _in_namespace(script: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """``script`` (bash) in new network and PID namespaces: on a timeout, killing ``unshare`` kills its child, the
    PID namespace's init, and with it every process inside (torchrun starts its workers in sessions of their own)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("a network namespace of the test's own needs root, unshare and ip")
    command = ["unshare", "--net", "--pid", "--fork", "--kill-child", "bash", "-c", NAMESPACE + script]
    process = subprocess.Popen(command, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
        out += f"\n[test: killed after {timeout} s]"
        process.returncode = 124
    if process.returncode == 90:
        pytest.skip(f"could not set up a network namespace with a veth interface: {out.strip()[-300:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, out, "")


def _no_interface_settings() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "HEAD_ADDR")}


def test_env_sh_derives_the_interface_of_the_head_address():
    """Gloo and NCCL default to the interface that holds the head address; a value already set is kept."""
    script = f"""export HEAD_ADDR={HEAD}
(source slurm/env.sh; echo "derived $GLOO_SOCKET_IFNAME $NCCL_SOCKET_IFNAME")
(export GLOO_SOCKET_IFNAME=ib0; source slurm/env.sh; echo "kept $GLOO_SOCKET_IFNAME $NCCL_SOCKET_IFNAME")
"""
    result = _in_namespace(script, _no_interface_settings(), timeout=60)
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    assert "derived d0 d0" in lines and "kept ib0 d0" in lines, result.stdout
    assert f"env.sh: GLOO_SOCKET_IFNAME=d0 (the interface of the head address {HEAD})" in lines  # says so


def test_two_nodes_rendezvous_on_a_head_address_that_is_not_the_host_name(tmp_path):
    """slurm/node.sh on "node 0" and "node 1" (the Slurm variables each srun task gets), the toy for one step.

    torchrun left to guess finds that neither agent's host name resolves to the head address, so neither hosts the
    rendezvous store and both time out connecting to it."""
    out = tmp_path / "run"
    args = ["trainer.max_steps=1", "toy_model.sft_steps=0", "algorithm.dynamic_sampling=false", "data.toy_num_val=1",
            "rollout.val_n=1", "trainer.export_hf=false", "logging.progress_bar=false", f"trainer.output_dir={out}"]
    env = dict(_no_interface_settings(), SLURM_JOB_NUM_NODES="2", SLURM_JOB_ID="4242", HEAD_ADDR=HEAD,
               MASTER_PORT="24242", NPROC_PER_NODE="1", CONFIG=str(TOY_CONFIG))
    script = f"""source slurm/env.sh
SLURM_NODEID=0 bash slurm/node.sh {" ".join(args)} >{tmp_path}/node0.log 2>&1 & node0=$!
SLURM_NODEID=1 bash slurm/node.sh {" ".join(args)} >{tmp_path}/node1.log 2>&1 & node1=$!
wait $node0; status0=$?; wait $node1; status1=$?
echo "node 0 exit $status0, node 1 exit $status1"; exit $((status0 | status1))
"""
    result = _in_namespace(script, env, timeout=300)
    logs = {node: (tmp_path / f"node{node}.log").read_text()[-2000:] for node in (0, 1) if (tmp_path / f"node{node}.log").exists()}
    assert result.returncode == 0, (result.stdout, logs)
    assert [row["step"] for row in _rows(out)] == [0, 1]


@pytest.mark.parametrize("mounts, missing", [
    ("{logs}:{logs}", "{repo} (repository)"),
    ("{repo}:{repo}", "{logs} (LOG_DIR)"),
    ("{repo}:/workspace,{logs}:{logs}", "{repo} (repository)"),  # mounted elsewhere: the job runs it by its path
    ("{repo}:{repo},{logs}:{logs}", "/elsewhere/run (trainer.output_dir)"),
])
def test_launch_sh_refuses_container_mounts_that_miss_a_path_of_the_job(tmp_path, mounts, missing):
    logs = tmp_path / "logs"
    names = dict(repo=ROOT, logs=logs)
    env = dict(os.environ, CONFIG=str(TOY_CONFIG), SLURM_JOB_ID="7", LOG_DIR=str(logs), NPROC_PER_NODE="1",
               CONTAINER_IMAGE="nvcr.io/example/dapo:1", CONTAINER_MOUNTS=mounts.format(**names))
    result = subprocess.run(["bash", "slurm/launch.sh", "trainer.output_dir=/elsewhere/run"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    path = missing.format(**names).split(" (")[0]
    assert result.stderr.splitlines() == [
        f"launch.sh: CONTAINER_MOUNTS={env['CONTAINER_MOUNTS']} does not mount {missing.format(**names)}: add "
        f"{path}:{path} (the job uses the same paths inside the container)"]
    assert not logs.exists()  # nothing written before the refusal
