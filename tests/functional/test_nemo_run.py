"""NeMo-Run launch script: the local executor trains the toy for real (torchrun, 2 processes), and the Slurm
executor's dry run prints the sbatch script of the H800 layout (the real Slurm submission is in test_slurm.py)."""

import json
import os
import subprocess
import sys

import pytest

from ..helpers import ROOT

pytestmark = pytest.mark.slow
nemo_run = pytest.importorskip("nemo_run")

LAUNCH = [sys.executable, "examples/nemo_run/launch_dapo.py"]


def test_local_executor_trains_the_toy(tmp_path, toy_warm_start):
    out = tmp_path / "run"
    command = [*LAUNCH, "--executor", "local", "--nproc-per-node", "2", "--config", "examples/configs/toy_cpu.yaml",
               "trainer.max_steps=2", toy_warm_start, "data.toy_num_val=8", "rollout.val_n=2",
               "logging.progress_bar=false", f"trainer.output_dir={out}"]
    result = subprocess.run(command, cwd=ROOT, env=dict(os.environ, NEMORUN_HOME=str(tmp_path / "home")),
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "SUCCEEDED" in result.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2]  # step 0: the evaluation before training


def test_slurm_dry_run_prints_the_h800_job(tmp_path):
    command = [*LAUNCH, "--executor", "slurm", "--dryrun", "--account", "acct", "--partition", "batch",
               "--container-image", "nvcr.io/example/dapo:1", "--container-mounts", "/data:/data",
               "--config", "examples/configs/qwen2.5_32b_dapo.yaml", "trainer.max_steps=10"]
    result = subprocess.run(command, cwd=ROOT, env=dict(os.environ, NEMORUN_HOME=str(tmp_path / "home"), COLUMNS="400"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    script = result.stdout
    for line in ("#SBATCH --nodes=16", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --account=acct", "#SBATCH --partition=batch", "#SBATCH --exclusive"):
        assert line in script, line
    assert "export NPROC_PER_NODE=8" in script  # slurm/node.sh's torchrun: 8 processes on each of 16 nodes
    assert f"export CONFIG={ROOT}/examples/configs/qwen2.5_32b_dapo.yaml" in script
    assert "--container-image nvcr.io/example/dapo:1" in script and "/data:/data" in script
    assert "slurm/env.sh" in script
    # the sbatch template's rendezvous (node 0 hosts it), not NeMo-Run's torchrun line with `hostname --ip-address`
    assert 'export HEAD_ADDR="${HEAD_ADDR:-$(head_address "$head_node")}"' in script
    assert f"bash {ROOT}/slurm/node.sh trainer.max_steps=10" in " ".join(script.split())
