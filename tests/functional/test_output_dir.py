"""An output directory has one owner (docs/reliability.md, "Output directories and inputs"): a run refused for
the folder or its checkpoint changes nothing in it, byte for byte; trainer.overwrite=true starts over."""

import hashlib
import socket
import subprocess

import pytest

from ..helpers import metrics_rows, run_cli

pytestmark = pytest.mark.slow  # end-to-end toy runs

# no warm start, no dynamic sampling, 4 prompts a step: the folder's bookkeeping is under test, not learning
SMALL = ["toy_model.sft_steps=0", "algorithm.dynamic_sampling=false", "algorithm.gen_batch_size=4",
         "algorithm.train_batch_size=4", "algorithm.mini_batch_size=32", "data.toy_num_val=4", "rollout.val_n=2",
         "trainer.export_hf=false", "logging.tensorboard=false", "trainer.max_steps=1"]


def _digest(folder) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def _one_line_refusal(result, expected: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr[-3000:]


def test_refused_runs_leave_the_output_dir_byte_identical_and_overwrite_starts_over(tmp_path):
    out = tmp_path / "run"
    first = run_cli(f"trainer.output_dir={out}", "parallel.use_distributed_optimizer=true", "trainer.save_interval=1",
                    *SMALL)
    assert first.returncode == 0, first.stderr[-3000:]
    before = _digest(out)
    assert "config.yaml" in before and "metrics.jsonl" in before and ".megatron-dapo.lock" not in before

    # another model: refused against the checkpoint's hf_config before anything is written
    other_model = run_cli(f"trainer.output_dir={out}", "toy_model.hidden_size=64", "trainer.save_interval=1", *SMALL)
    _one_line_refusal(other_model, "belong to different models")
    assert _digest(out) == before
    # megatron-core 0.16.1 cannot load distributed-optimizer state on this CPU fallback: refused at the load
    unloadable = run_cli(f"trainer.output_dir={out}", "parallel.use_distributed_optimizer=true",
                         "trainer.save_interval=1", *SMALL[:-1], "trainer.max_steps=2")
    _one_line_refusal(unloadable, "parallel.use_distributed_optimizer=true")
    assert _digest(out) == before
    # a checkpoint, but no resume: the folder is another run's
    no_resume = run_cli(f"trainer.output_dir={out}", "trainer.resume=false", *SMALL)
    _one_line_refusal(no_resume, f"trainer.output_dir={out} holds another run's output")
    assert "trainer.overwrite=true" in no_resume.stderr
    assert _digest(out) == before

    # a live run holds the folder: the second stops at once
    holder = subprocess.Popen(["sleep", "300"])
    try:
        (out / ".megatron-dapo.lock").write_text(f"{socket.gethostname()} {holder.pid} -\n")
        held = before | {".megatron-dapo.lock": _digest(out)[".megatron-dapo.lock"]}
        busy = run_cli(f"trainer.output_dir={out}", *SMALL)
        _one_line_refusal(busy, f"is in use by the run of pid {holder.pid}")
        assert _digest(out) == held
    finally:
        holder.kill()
        holder.wait()
    # its pid is gone now: the lock is stale and taken over; overwrite replaces the old run's output
    again = run_cli(f"trainer.output_dir={out}", "trainer.overwrite=true", *SMALL)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"taking over the stale lock of pid {holder.pid}" in again.stdout
    assert "output: trainer.overwrite=true: removed " in again.stdout
    assert [row["step"] for row in metrics_rows(out)] == [0, 1]
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
    assert not (out / ".megatron-dapo.lock").exists()
