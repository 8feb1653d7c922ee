"""Stopping for a requeue. Schedulers warn before a time limit or a preemption: every rank stops at the next
step boundary — they agree with one all-reduce per step — after a checkpoint, when any rank has received SIGTERM
or SIGUSR1, or when the launcher has created the stop file it names (``MEGATRON_DAPO_STOP_FILE``). The trainer
then exits with ``REQUEUE_EXIT_CODE`` and writes the marker file the launcher names
(``MEGATRON_DAPO_REQUEUE_MARKER``), so that the launcher requeues the job, which resumes from that checkpoint.

Why a file as well as signals: Slurm forwards a signal to a job step by signalling every process of it, which
ends the helpers megatron-core spawns for checkpointing (default signal action) and torchrun (which exits on
SIGUSR1). The batch script alone receives the warning (``--signal=B:USR1@...``) and turns it into the file,
which every rank looks for on the shared file system (slurm/launch.sh).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: try again
MARKER_ENV = "MEGATRON_DAPO_REQUEUE_MARKER"
STOP_FILE_ENV = "MEGATRON_DAPO_STOP_FILE"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_STOP_FILE_CODE = 1000  # above every signal number: the all-reduce's MAX reports a signal only when no file


class Preempted(Exception):
    """Every rank stopped after checkpointing ``step`` because a stop was requested."""

    def __init__(self, step: int, reason: str) -> None:
        super().__init__(f"stopped after step {step} ({reason}) with a checkpoint, for a requeue")
        self.step = step


class StopRequests:
    """Records SIGTERM/SIGUSR1 (the handlers only set a flag: a checkpoint being written is never cut short) and
    watches the launcher's stop file."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.stop_file = os.environ.get(STOP_FILE_ENV) or None
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                signal.signal(signum, self._record)

    def _record(self, signum: int, _frame: object) -> None:
        self.received = signum

    def agreed(self, device: torch.device) -> str | None:
        """Why to stop when any rank was asked to (collective: every rank learns it), else ``None``."""
        code = _STOP_FILE_CODE if self.stop_file and Path(self.stop_file).exists() else (self.received or 0)
        flag = torch.tensor([float(code)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        code = int(flag.item())
        if code == 0:
            return None
        return "stop file" if code == _STOP_FILE_CODE else f"{signal.Signals(code).name} received"


def write_requeue_marker(reason: str) -> None:
    """Tell the launcher to requeue the job (a file it named; nothing when no launcher asked)."""
    marker = os.environ.get(MARKER_ENV)
    if marker:
        Path(marker).parent.mkdir(parents=True, exist_ok=True)
        Path(marker).write_text(reason + "\n")
