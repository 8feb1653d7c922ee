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
second Ctrl-C exits at once. A launcher may deliver one key press twice (the terminal signals a process group,
the launcher forwards its own copy): a SIGINT within ``SAME_CTRL_C_S`` of the first counts as the same one. torchrun
starts its workers in sessions of their own (torch/distributed/elastic/multiprocessing/subprocess_handler/
subprocess_handler.py:66) and forwards the SIGINT it receives once, then kills them after 30 s (agent/server/
api.py:753, multiprocessing/api.py:1023; ``--shutdown-timeout`` sets it). Before the first step (toy warm start, model loading) there is nothing
to checkpoint: every rank stops at the end of the warm start's current step or of model loading (``Stopped``),
saying that no checkpoint was written.
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
    """A signal arrived before the first step: every rank stopped before training; no checkpoint was written."""

    def __init__(self, signum: int, phase: str) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"stopped during {phase} ({name} received) before the first step: no checkpoint was written")
        self.exit_code = exit_code_for(name)
        self.signum, self.phase = signum, phase

    def __reduce__(self) -> tuple:
        return Stopped, (self.signum, self.phase)  # run_on_rank_zero hands it to every rank


class StopRequests:
    """Records SIGTERM/SIGUSR1/SIGINT and watches the launcher's stop file.

    The handlers only set a flag (the second Ctrl-C excepted): raising inside them could interrupt one rank
    between the two halves of a collective and leave the others waiting or failing with a traceback, and a
    checkpoint being written is never cut short. The flag is acted on where every rank can stop together: at
    each step end (``agreed``), after model loading (``stop_if_any_rank``) and, on the rank that runs it, at each
    step of the toy warm start (``stop_if_signalled``: its result or exception reaches every rank).
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.stop_file = os.environ.get(STOP_FILE_ENV) or None
        self.steps_began = False
        self._first_ctrl_c: float | None = None
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                signal.signal(signum, self._record)

    def steps_begin(self) -> None:
        """From now on a stop comes at the next step boundary, after a checkpoint."""
        self.steps_began = True

    def _record(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_ctrl_c is not None and now - self._first_ctrl_c > SAME_CTRL_C_S:
                print("interrupted again: exiting now, without a checkpoint of this step", file=sys.stderr, flush=True)
                os._exit(INTERRUPT_EXIT_CODE)  # a collective may be waiting: nothing else would end the process
            if self._first_ctrl_c is None:
                self._first_ctrl_c = now
                if int(os.environ.get("RANK", "0")) == 0:  # one line per job (torchrun's RANK; 0 without it)
                    where = ("at the next step boundary with a checkpoint" if self.steps_began
                             else "once the warm start or model loading can stop")
                    print(f"interrupted: stopping {where} (Ctrl-C again to exit at once)", file=sys.stderr, flush=True)
        self.received = self.received or signum

    def stop_if_signalled(self, phase: str) -> None:
        """Raise ``Stopped`` when this rank received a signal (for work that this rank alone does)."""
        if self.received is not None:
            raise Stopped(self.received, phase)

    def stop_if_any_rank(self, phase: str, device: torch.device) -> None:
        """Raise ``Stopped`` on every rank when any rank received a signal (collective). Before the first step
        only signals count: the launcher's stop file waits for step 1 and its checkpoint."""
        code = _max_over_ranks(self.received or 0, device)
        if code:
            raise Stopped(code, phase)

    def agreed(self, device: torch.device) -> str | None:
        """Why to stop when any rank was asked to (collective: every rank learns it), else ``None``."""
        code = _STOP_FILE_CODE if self.stop_file and Path(self.stop_file).exists() else (self.received or 0)
        code = _max_over_ranks(code, device)
        if code == 0:
            return None
        return "stop file" if code == _STOP_FILE_CODE else f"{signal.Signals(code).name} received"


def _max_over_ranks(code: int, device: torch.device) -> int:
    flag = torch.tensor([float(code)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


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
