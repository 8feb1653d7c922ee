"""Mistakes a new user makes end in one line naming what to fix, exit code 2, before any work starts."""

import os
import subprocess
import sys

import pytest

from ..helpers import ROOT, TOY_CONFIG, run_cli


@pytest.mark.parametrize(
    "args, config, expected",
    [
        ([], "nope.yaml", "config file nope.yaml not found"),
        (["parallel.tensor_model_parallel_size=2"], None, "torchrun --nproc-per-node 2"),
        (["algorithm.clip_ratio_c=0.5"], None, "algorithm.clip_ratio_c=0.5 must be > 1"),
        (["rollout.top_p=0"], None, "rollout.top_p=0.0 must be in (0, 1]"),
        (["rollout.engine=vllm"], None, "rollout.engine='vllm' must be one of ['hf', 'sglang']"),
    ],
    ids=["missing-config", "tp-without-torchrun", "dual-clip", "top-p", "engine"],
)
def test_one_line_error_before_any_work(tmp_path, args, config, expected):
    out = tmp_path / "run"
    result = run_cli(f"trainer.output_dir={out}", *args, config=config or TOY_CONFIG, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr[-2000:]
    assert not out.exists()  # nothing was written


def test_layout_that_cannot_shard_the_model_is_refused_naming_the_field(tmp_path):
    """Heads not divisible by TP: known from the model config before any data or model is built."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "megatron_dapo",
               "train", "--config", str(TOY_CONFIG), f"trainer.output_dir={out}", "parallel.tensor_model_parallel_size=2",
               "toy_model.num_attention_heads=3", "toy_model.num_key_value_heads=3", "logging.progress_bar=false"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: parallel.tensor_model_parallel_size=2 must divide num_attention_heads=3 and "
                      "num_key_value_heads=3 of the model config; choose a divisor of 3"]
    assert not (out / "toy_init").exists()


@pytest.mark.slow
def test_a_user_error_under_the_torchrun_launcher_is_one_line_without_traceback(tmp_path):
    """``python -m megatron_dapo.torchrun`` (what slurm/node.sh runs): the workers' one line, exit code 2, no
    ChildFailedError traceback; plain torchrun prints that traceback under the same line."""
    out = tmp_path / "run"
    launch = ["--standalone", "--nproc-per-node", "2", "-m", "megatron_dapo", "train", "--config", str(TOY_CONFIG),
              f"trainer.output_dir={out}", "algorithm.clip_ratio_c=0.5", "logging.progress_bar=false"]
    # OMP_NUM_THREADS set: torchrun otherwise prints a notice that it chose 1 (a banner, not an error)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "megatron_dapo.torchrun", *launch], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        "error: algorithm.clip_ratio_c=0.5 must be > 1 (the reference uses 10), or null to disable"
    ], result.stderr[-3000:]
    assert not out.exists()
