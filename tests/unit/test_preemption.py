"""Stop requests (megatron_dapo/preemption.py): a signal or the launcher's stop file on one rank stops every rank
(two processes over gloo, the agreement's all-reduce for real); the requeue marker goes where the launcher says."""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_dapo.preemption import (
    INTERRUPT_EXIT_CODE, MARKER_ENV, SAME_CTRL_C_S, SIGNALS, STOP_FILE_ENV, Preempted, Stopped, StopRequests,
    clear_requeue_marker, write_requeue_marker,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agree(rank: int, port: int, request: str, stop_file: str, results: dict) -> None:
    os.environ[STOP_FILE_ENV] = stop_file
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        stops = StopRequests()
        stops.steps_begin()  # the step loop
        seen = [stops.agreed(torch.device("cpu"))]  # nothing asked yet
        if rank == 1 and request == "signal":
            os.kill(os.getpid(), signal.SIGUSR1)  # the handler only records it
        if rank == 1 and request == "file":
            open(stop_file, "w").close()
        dist.barrier()
        seen.append(stops.agreed(torch.device("cpu")))
        results[rank] = seen
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("request_kind, reason", [("signal", "SIGUSR1 received"), ("file", "stop file")])
def test_a_request_on_one_rank_stops_every_rank(tmp_path, request_kind, reason):
    results = mp.Manager().dict()
    mp.spawn(_agree, args=(_free_port(), request_kind, str(tmp_path / "stop"), results), nprocs=2, join=True)
    assert dict(results) == {0: [None, reason], 1: [None, reason]}


def test_the_requeue_marker_is_written_only_when_a_launcher_names_it(tmp_path, monkeypatch):
    monkeypatch.delenv(MARKER_ENV, raising=False)
    write_requeue_marker("stopped")  # no launcher: nothing to write, no error
    marker = tmp_path / "logs" / "requeue"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    write_requeue_marker("stopped after step 3")
    assert marker.read_text() == "stopped after step 3\n"


# ---------------------------------------------------------------------------------------------- Ctrl-C (SIGINT)
# In a fresh interpreter: a second Ctrl-C ends the process (os._exit), which pytest's own process must not do.
CTRL_C = """
import os, signal, sys, time
import torch, torch.distributed as dist
from megatron_dapo.preemption import StopRequests
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
stops = StopRequests()
stops.steps_begin()
os.kill(os.getpid(), signal.SIGINT)
os.kill(os.getpid(), signal.SIGINT)  # torchrun's forwarded copy of the same key press
print("agreed:", stops.agreed(torch.device("cpu")), flush=True)
time.sleep({pause})
os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C again
print("still running", flush=True)
"""


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_ctrl_c_is_a_stop_request_and_a_second_one_exits_at_once_without_a_traceback():
    result = _python(CTRL_C.format(port=_free_port(), pause=SAME_CTRL_C_S + 0.5))
    assert result.stdout == "agreed: SIGINT received\n"  # stopped at the step boundary, not by KeyboardInterrupt
    assert result.returncode == INTERRUPT_EXIT_CODE
    assert result.stderr.splitlines() == [
        "interrupted: stopping at the next step boundary with a checkpoint (Ctrl-C again to exit at once)",
        "interrupted again: exiting now, without a checkpoint of this step",
    ]


def _before_steps(rank: int, port: int, stop_file: str, results: dict) -> None:
    os.environ[STOP_FILE_ENV] = stop_file
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        stops = StopRequests()
        open(stop_file, "w").close()  # the launcher's stop file waits for step 1 and its checkpoint
        stops.stop_if_any_rank("model loading", torch.device("cpu"))
        if rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # recorded only: rank 0 knows nothing of it
        try:
            stops.stop_if_any_rank("model loading", torch.device("cpu"))
        except Stopped as stopped:
            results[rank] = (str(stopped), stopped.exit_code)
    finally:
        dist.destroy_process_group()


def test_a_signal_before_the_first_step_stops_every_rank_saying_that_no_checkpoint_exists(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_before_steps, args=(_free_port(), str(tmp_path / "stop"), results), nprocs=2, join=True)
    line = "stopped during model loading (SIGTERM received) before the first step: no checkpoint was written"
    assert dict(results) == {0: (line, 75), 1: (line, 75)}


def test_the_warm_start_rank_stops_on_its_own_signal_and_the_error_travels_to_every_rank():
    stops = StopRequests()
    try:
        stops.stop_if_signalled("the toy warm start")  # nothing received: goes on
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: recorded, one line on stderr
        with pytest.raises(Stopped) as stopped:
            stops.stop_if_signalled("the toy warm start")
    finally:
        for signum in SIGNALS:
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
    assert str(stopped.value) == ("stopped during the toy warm start (SIGINT received) before the first step: "
                                  "no checkpoint was written")
    assert stopped.value.exit_code == 130  # Ctrl-C: nothing to requeue
    copy = pickle.loads(pickle.dumps(stopped.value))  # run_on_rank_zero sends rank 0's exception to every rank
    assert (str(copy), copy.exit_code) == (str(stopped.value), 130)


def test_preempted_by_ctrl_c_is_not_requeued():
    assert Preempted(3, "SIGINT received").exit_code == 130
    assert str(Preempted(3, "SIGINT received")) == ("stopped after step 3 (SIGINT received) with a checkpoint, "
                                                    "resume with the same command")
    assert Preempted(3, "stop file").exit_code == 75


def test_a_finished_run_removes_the_marker_an_earlier_try_wrote(tmp_path, monkeypatch):
    marker = tmp_path / "requeue"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    write_requeue_marker("stall: ...")
    clear_requeue_marker()
    assert not marker.exists()
    clear_requeue_marker()  # none there: nothing to do
