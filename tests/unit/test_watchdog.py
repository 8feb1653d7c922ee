"""The stall watchdog (megatron_dapo/watchdog.py): two real processes over gloo, one stopped with SIGSTOP; the
other, waiting in a collective, dumps its stacks, names the stopped rank and exits for a requeue."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from megatron_dapo.preemption import MARKER_ENV, REQUEUE_EXIT_CODE
from megatron_dapo.watchdog import silent_ranks

from .test_preemption import _free_port

RANK = """
import os, signal, sys
from pathlib import Path
import torch.distributed as dist
from megatron_dapo.watchdog import StallWatchdog
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=rank, world_size=2)
watchdog = StallWatchdog(4.0, Path("{folder}"), rank, 2)
dist.barrier()  # both ranks answer
watchdog.progress(7)
if rank == 1:
    os.kill(os.getpid(), signal.SIGSTOP)  # a rank that stops answering
dist.barrier()  # rank 0 waits here forever
"""


def test_silent_ranks_are_those_whose_heartbeat_is_old_or_missing(tmp_path):
    (tmp_path / "rank_0").write_text("100.0 3\n")
    (tmp_path / "rank_1").write_text("90.0 3\n")
    (tmp_path / "rank_3").write_text("")  # caught before its first write
    assert silent_ranks(tmp_path, 4, now=105.0, max_age_s=6.0) == [1, 2, 3]


def test_a_stopped_rank_is_named_by_its_peer_which_dumps_its_stacks_and_exits_for_a_requeue(tmp_path):
    code = RANK.format(port=_free_port(), folder=tmp_path / "heartbeats")
    env = dict(os.environ, **{MARKER_ENV: str(tmp_path / "marker")})
    ranks = [subprocess.Popen([sys.executable, "-c", code, str(rank)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    try:
        start = time.monotonic()
        _, stderr = ranks[0].communicate(timeout=60)
        elapsed = time.monotonic() - start
        assert ranks[1].poll() is None  # still stopped: it could not act
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    assert ranks[0].returncode == REQUEUE_EXIT_CODE, stderr
    assert elapsed < 30  # 4 s without progress, then a poll (1 s); not the collective's own 30-minute timeout
    lines = stderr.strip().splitlines()
    assert "(most recent call first)" in stderr and "in <module>" in stderr  # faulthandler's dump of the threads
    assert lines[-1] == (
        "stall: rank 0 made no progress in step 7 for 4 s (trainer.stall_timeout_s); rank(s) 1 stopped answering "
        f"(no heartbeat in {tmp_path / 'heartbeats'}); Python stacks above; exiting for a requeue from the last "
        "checkpoint"
    )
    assert (tmp_path / "marker").read_text() == lines[-1] + "\n"  # slurm/launch.sh requeues on it
