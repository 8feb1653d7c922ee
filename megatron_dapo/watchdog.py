"""A stalled rank ends the job, not the allocation (``trainer.stall_timeout_s``).

A rank that stops answering (SIGSTOP, a hung driver, a dead node) leaves its peers waiting in a collective that
never completes, holding the allocation until its time limit. Every rank runs a watchdog thread. The thread
writes a heartbeat file (``<output_dir>/heartbeats/rank_<r>``: wall time and step) at every poll, whatever the
main thread is doing, so a rank stuck in a collective still beats and a stopped process does not. When this
rank's training loop has made no progress for ``stall_timeout_s``, the watchdog dumps every thread's Python stack
(``faulthandler``) to stderr, prints one line naming the ranks whose heartbeat went silent, writes the launcher's
requeue marker and ends the process with ``os._exit`` (the main thread is inside a collective: nothing else
would end it). slurm/launch.sh requeues the job; the requeued run resumes from the last checkpoint.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from pathlib import Path

from megatron_dapo.preemption import REQUEUE_EXIT_CODE, write_requeue_marker

STALL_EXIT_CODE = REQUEUE_EXIT_CODE  # the launcher requeues: the next run resumes from the last checkpoint
MAX_POLL_S = 10.0


def heartbeat_path(folder: Path, rank: int) -> Path:
    return folder / f"rank_{rank}"


def silent_ranks(folder: Path, world_size: int, now: float, max_age_s: float) -> list[int]:
    """Ranks whose heartbeat is missing or older than ``max_age_s`` at wall time ``now``."""
    silent = []
    for rank in range(world_size):
        try:
            beat = float(heartbeat_path(folder, rank).read_text().split()[0])
        except (OSError, ValueError, IndexError):  # never written, or caught mid-replace
            beat = float("-inf")
        if now - beat > max_age_s:
            silent.append(rank)
    return silent


class StallWatchdog:
    """This rank's watchdog thread; ``progress(step)`` from the training loop (``step``: the one running) resets
    its clock."""

    def __init__(self, timeout_s: float, folder: Path, rank: int, world_size: int) -> None:
        self.timeout_s, self.folder, self.rank, self.world_size = timeout_s, folder, rank, world_size
        self.poll_s = min(timeout_s / 4, MAX_POLL_S)
        self.step = 0
        self._last_progress = time.monotonic()
        self._closed = threading.Event()
        folder.mkdir(parents=True, exist_ok=True)
        self._beat()
        self._thread = threading.Thread(target=self._watch, name="stall-watchdog", daemon=True)
        self._thread.start()

    def progress(self, step: int) -> None:
        self.step, self._last_progress = step, time.monotonic()

    def close(self) -> None:
        self._closed.set()
        self._thread.join()

    def _beat(self) -> None:
        path = heartbeat_path(self.folder, self.rank)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"{time.time()} {self.step}\n")
        tmp.replace(path)  # readers never see a half-written file

    def _watch(self) -> None:
        while not self._closed.wait(self.poll_s):
            self._beat()
            if time.monotonic() - self._last_progress > self.timeout_s:
                self._fire()

    def _fire(self) -> None:
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        # a live rank beat at most one poll ago; three polls leave room for a slow shared file system
        silent = silent_ranks(self.folder, self.world_size, time.time(), 3 * self.poll_s)
        who = (f"rank(s) {', '.join(map(str, silent))} stopped answering (no heartbeat in {self.folder})" if silent
               else "every rank still answers: a collective never completed")
        message = (f"stall: rank {self.rank} made no progress in step {self.step} for {self.timeout_s:g} s "
                   f"(trainer.stall_timeout_s); {who}; Python stacks above; exiting for a requeue from the last "
                   "checkpoint")
        print(message, file=sys.stderr, flush=True)
        write_requeue_marker(message)
        os._exit(STALL_EXIT_CODE)
