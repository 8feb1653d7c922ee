"""Stop requests (megatron_dapo/preemption.py): a signal or the launcher's stop file on one rank stops every rank
(two processes over gloo, the agreement's all-reduce for real); the requeue marker goes where the launcher says."""

from __future__ import annotations

import os
import signal
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_dapo.preemption import MARKER_ENV, STOP_FILE_ENV, StopRequests, write_requeue_marker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agree(rank: int, port: int, request: str, stop_file: str, results: dict) -> None:
    os.environ[STOP_FILE_ENV] = stop_file
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        stops = StopRequests()
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
