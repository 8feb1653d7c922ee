"""Stopping for a requeue. Schedulers warn before a time limit or a preemption: every rank stops at the next
step boundary — they agree with one all-reduce per step — after a checkpoint, when any rank has received SIGTERM
or SIGUSR1, or when the launcher has created the stop file it names (``MEGATRON_DAPO_STOP_FILE``). The trainer
then exits with ``REQUEUE_EXIT_CODE`` and writes the marker file the launcher names
(``MEGATRON_DAPO_REQUEUE_MARKER``), so that the launcher requeues the job, which resumes from that checkpoint.

Why a file as well as signals: Slurm forwards a signal to a job step by signalling every process of it, which
ends the helpers megatron-core spawns for checkpointing (default signal action) and torchrun (which exits on
SIGUSR1). The batch script alone receives the warning (``--signal=B:USR1@...``) and turns it into the file,
which every rank looks for on the shared file system (slurm/launch.sh).

Ctrl-C (SIGINT) is a stop request too, from a user rather than a scheduler: the run checkpoints at the next step
boundary and exits with ``INTERRUPT_EXIT_CODE`` (130, the shell's code for Ctrl-C) without a requeue marker; a
second Ctrl-C exits at once. Under torchrun a Ctrl-C reaches every worker twice (the terminal signals the whole
process group, then torchrun forwards its own SIGINT): one within ``SAME_CTRL_C_S`` of the first counts as the same
key press. Before the first step (toy warm start, model loading) there is nothing to checkpoint: a signal stops
the rank where it is (``Stopped``), which says that no checkpoint was written.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: try again
INTERRUPT_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
MARKER_ENV = "MEGATRON_DAPO_REQUEUE_MARKER"
STOP_FILE_ENV = "MEGATRON_DAPO_STOP_FILE"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
SAME_CTRL_C_S = 2.0
_STOP_FILE_CODE = 1000  # above every signal number: the all-reduce's MAX reports a signal only when no file


def exit_code_for(reason: str) -> int:
    """Ctrl-C: 130, nothing to requeue; a scheduler's request: 75, so that the launcher requeues."""
    return INTERRUPT_EXIT_CODE if reason.startswith(signal.SIGINT.name) else REQUEUE_EXIT_CODE


class Preempted(Exception):
    """Every rank stopped after checkpointing ``step`` because a stop was requested."""

    def __init__(self, step: int, reason: str) -> None:
        why = "resume with the same command" if exit_code_for(reason) == INTERRUPT_EXIT_CODE else "for a requeue"
        super().__init__(f"stopped after step {step} ({reason}) with a checkpoint, {why}")
        self.exit_code = exit_code_for(reason)


class Stopped(Exception):
    """A signal arrived before the first step: this rank stopped where it was; no checkpoint was written."""

    def __init__(self, signum: int, phase: str) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"stopped during {phase} ({name} received) before the first step: no checkpoint was written")
        self.exit_code = exit_code_for(name)
        self.signum, self.phase = signum, phase

    def __reduce__(self) -> tuple:
        return Stopped, (self.signum, self.phase)  # run_on_rank_zero hands it to every rank


class StopRequests:
    """Records SIGTERM/SIGUSR1/SIGINT and watches the launcher's stop file.

    During ``phase`` (set before the first step: the warm start, model loading) a signal raises ``Stopped`` at
    once; from ``steps_begin()`` on the handlers only set a flag, so a checkpoint being written is never cut short.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.stop_file = os.environ.get(STOP_FILE_ENV) or None
        self.phase: str | None = "the warm start or model loading"
        self._first_ctrl_c: float | None = None
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                signal.signal(signum, self._record)

    def steps_begin(self) -> None:
        """From now on a signal is acted on at the next step boundary, after a checkpoint."""
        self.phase = None

    def _record(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_ctrl_c is not None and now - self._first_ctrl_c > SAME_CTRL_C_S:
                print("interrupted again: exiting now, without a checkpoint of this step", file=sys.stderr, flush=True)
                os._exit(INTERRUPT_EXIT_CODE)  # a collective may be waiting: nothing else would end the process
            if self._first_ctrl_c is None:
                self._first_ctrl_c = now
                if self.phase is None:
                    print("interrupted: stopping at the next step boundary with a checkpoint "
                          "(Ctrl-C again to exit at once)", file=sys.stderr, flush=True)
        self.received = self.received or signum
        if self.phase is not None:
            phase, self.phase = self.phase, None  # a repeated signal must not interrupt the unwinding
            raise Stopped(signum, phase)

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


def clear_requeue_marker() -> None:
    """A finished run: drop a marker that an earlier try inside the same job wrote (a stall, then torchrun's
    in-job restart finished the run), so that the launcher does not requeue a finished job."""
    marker = os.environ.get(MARKER_ENV)
    if marker:
        Path(marker).unlink(missing_ok=True)
