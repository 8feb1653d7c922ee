"""Interruptions, stalls and in-job restarts of a 2-process torchrun toy run (docs/reliability.md): Ctrl-C
checkpoints and stops with one line; a signal during the warm start stops there; a rank stopped with SIGSTOP is
named by its peer, which ends the job for a requeue; a worker killed with SIGKILL is restarted by torchrun
(``--max-restarts``) and the run resumes from its last checkpoint, logging each step once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ..helpers import ROOT, TOY_CONFIG, metrics_rows, run_cli

pytestmark = pytest.mark.slow  # multi-process or end-to-end: minutes on 2 cores

TINY = ["toy_model.sft_steps=20", "algorithm.dynamic_sampling=false", "data.toy_num_val=4", "rollout.val_n=2",
        "trainer.export_hf=false", "logging.progress_bar=false", "optimizer.lr_warmup_steps=2"]
COMPARED = ["actor/pg_loss", "actor/grad_norm", "actor/lr", "acc/mean", "entropy/mean"]


def _torchrun(out: Path, *overrides: str, restarts: int = 0) -> list[str]:
    # --shutdown-timeout: torchrun SIGKILLs its workers this long after forwarding a signal (default 30 s; a toy
    # step on 2 cores shared with other jobs can take longer)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "--max-restarts", str(restarts), "--shutdown-timeout", "600", "-m", "megatron_dapo", "train", "--config", str(TOY_CONFIG),
            f"trainer.output_dir={out}", *TINY, *overrides]


@contextlib.contextmanager
def _launched(command: list[str], log: Path, env: dict | None = None):
    """torchrun with its output in a file (an orphaned checkpoint worker could hold a pipe open: pitfalls, test_resume)
    in a session of its own; afterwards every process it started is killed (its workers have sessions of their own)."""
    with log.open("w") as sink:
        launcher = subprocess.Popen(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=env)
        try:
            yield launcher
        finally:
            with contextlib.suppress(psutil.NoSuchProcess):
                for process in [*psutil.Process(launcher.pid).children(recursive=True), psutil.Process(launcher.pid)]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        process.kill()
            launcher.wait()


def _wait_for(condition, launcher: subprocess.Popen, log: Path, timeout: float = 900) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert launcher.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < end, log.read_text()[-3000:]
        time.sleep(0.2)


def _steps_logged(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


def _worker(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    return next(p for p in psutil.Process(launcher.pid).children() if p.environ().get("RANK") == str(rank))


def _no_traceback_of_ours(log: str) -> None:
    assert "[rank0]" not in log and "[rank1]" not in log and "megatron_dapo/" not in log, log[-3000:]


def test_ctrl_c_stops_every_rank_at_the_step_boundary_with_a_checkpoint(tmp_path):
    out, log = tmp_path / "run", tmp_path / "log"
    with _launched(_torchrun(out, "trainer.max_steps=50", "trainer.save_interval=0"), log) as launcher:
        _wait_for(lambda: 1 in _steps_logged(out), launcher, log)
        os.killpg(launcher.pid, signal.SIGINT)  # Ctrl-C in the terminal: torchrun forwards it to its workers
        launcher.wait(timeout=120)
    text = log.read_text()
    stopped_after = int((out / "checkpoints" / "latest_checkpointed_iteration.txt").read_text())
    assert stopped_after < 50 and _steps_logged(out) == list(range(stopped_after + 1))
    assert text.count("interrupted: stopping at the next step boundary with a checkpoint (Ctrl-C again to exit at "
                      "once)") == 1
    assert text.count(f"interrupted: stopped after step {stopped_after} (SIGINT received) with a checkpoint, "
                      "resume with the same command") == 1
    _no_traceback_of_ours(text)  # torchrun's own SignalException traceback is torchrun's (docs/reliability.md)


def test_sigterm_during_the_warm_start_stops_every_rank_there_with_one_line(tmp_path):
    out, log, marker = tmp_path / "run", tmp_path / "log", tmp_path / "marker"
    env = dict(os.environ, MEGATRON_DAPO_REQUEUE_MARKER=str(marker))
    with _launched(_torchrun(out, "toy_model.sft_steps=100000"), log, env) as launcher:
        _wait_for(lambda: (out / "data" / "train.parquet").exists(), launcher, log)  # rank 0 warm-starts next
        time.sleep(3)
        os.killpg(launcher.pid, signal.SIGTERM)  # torchrun forwards it
        launcher.wait(timeout=120)
    text = log.read_text()
    line = ("preempted: stopped during the toy warm start (SIGTERM received) before the first step: no checkpoint "
            "was written")
    assert text.count(line) == 1, text[-3000:]
    assert marker.read_text().startswith("stopped during the toy warm start")
    assert not (out / "checkpoints").exists() and not (out / "toy_init").exists()
    _no_traceback_of_ours(text)


def test_a_rank_stopped_with_sigstop_is_named_and_the_job_ends_for_a_requeue(tmp_path):
    out, log, marker = tmp_path / "run", tmp_path / "log", tmp_path / "marker"
    env = dict(os.environ, MEGATRON_DAPO_REQUEUE_MARKER=str(marker))
    with _launched(_torchrun(out, "trainer.max_steps=50", "trainer.stall_timeout_s=8"), log, env) as launcher:
        _wait_for(lambda: 1 in _steps_logged(out), launcher, log)
        stopped = _worker(launcher, 1)
        stopped.suspend()  # SIGSTOP
        start = time.monotonic()
        _wait_for(lambda: marker.exists(), launcher, log, timeout=120)
        named_after = time.monotonic() - start
        launcher.wait(timeout=120)  # torchrun ends the stopped worker (SIGKILL after its 30 s of grace)
    text = log.read_text()
    assert launcher.returncode != 0
    assert named_after < 60  # 8 s without progress, then one poll: not gloo's 30-minute collective timeout
    assert "(most recent call first)" in text  # rank 0's Python stacks
    stall = [line for line in text.splitlines() if line.startswith("stall: ")]
    assert len(stall) == 1 and "rank(s) 1 stopped answering" in stall[0] and stall[0].startswith("stall: rank 0 "), text[-3000:]
    assert marker.read_text() == stall[0] + "\n"  # slurm/launch.sh requeues on it; the next run resumes


def test_a_worker_killed_mid_run_is_restarted_in_the_job_and_the_run_equals_an_uninterrupted_one(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    args = ["trainer.max_steps=3", "trainer.save_interval=1"]
    with _launched(_torchrun(whole, *args), tmp_path / "whole.log") as launcher:
        assert launcher.wait(timeout=900) == 0, (tmp_path / "whole.log").read_text()[-3000:]
    log = tmp_path / "split.log"
    tracker = split / "checkpoints" / "latest_checkpointed_iteration.txt"
    with _launched(_torchrun(split, *args, restarts=1), log) as launcher:
        _wait_for(lambda: tracker.exists(), launcher, log)  # checkpoint 1 is complete: step 2 runs
        _worker(launcher, 1).kill()  # SIGKILL
        assert launcher.wait(timeout=900) == 0, log.read_text()[-3000:]
    # the same torchrun saw its worker die and still ended well: its workers were restarted inside the job
    assert "failed (exitcode: -9) local_rank: 1" in log.read_text()
    expected, resumed = metrics_rows(whole), metrics_rows(split)
    assert [r["step"] for r in resumed] == [0, 1, 2, 3]  # each step once
    for step in (1, 2, 3):
        for key in COMPARED:
            assert resumed[step][key] == pytest.approx(expected[step][key], rel=1e-6, abs=1e-9), (step, key)


def test_a_restart_while_the_stop_file_is_there_stops_again_before_loading(tmp_path):
    """torchrun --max-restarts restarts workers that stopped for a requeue too: the restarted run must not train
    on into the scheduler's time limit."""
    out, stop, marker = tmp_path / "run", tmp_path / "stop", tmp_path / "marker"
    stop.touch()
    env = dict(os.environ, MEGATRON_DAPO_STOP_FILE=str(stop), MEGATRON_DAPO_REQUEUE_MARKER=str(marker))
    args = [f"trainer.output_dir={out}", "trainer.max_steps=3", *TINY]
    assert run_cli(*args, env=env).returncode == 75  # stopped after step 1 with a checkpoint
    again = run_cli(*args, env=env)
    assert again.returncode == 75, again.stderr[-3000:]
    assert again.stdout.splitlines() == ["preempted: stopped after step 1 (stop file) with a checkpoint, for a requeue"]
    assert _steps_logged(out) == [0, 1]
