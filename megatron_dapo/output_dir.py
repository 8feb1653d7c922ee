"""An output directory has one owner: a lock while a run writes there, and no run that starts over another's output.

Global rank 0 decides (``distributed.run_on_rank_zero`` hands its refusal to every rank) before anything is
written: a second run started into the same ``trainer.output_dir`` stops at once, and a run whose folder holds
another run's output and no checkpoint to resume refuses instead of overwriting ``metrics.jsonl``,
``config.yaml``, ``hf_final/`` and ``report.png`` (docs/reliability.md, "Output directories and inputs").
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from megatron_dapo.config import TrainerConfig
from megatron_dapo.errors import UserError
from megatron_dapo.metrics import WANDB_RUN_ID_FILE
from megatron_dapo.model_config import check_same_model
from megatron_dapo.weights.checkpoint_reader import (
    HF_CONFIG_DIR, TRACKER_FILE, saved_iterations, strict_resume_refusal,
)

LOCK_FILE = ".megatron-dapo.lock"
# what marks a folder as a run's output; trainer.overwrite removes these and the run's other products
RUN_OUTPUTS = ("metrics.jsonl", "config.yaml", "report.png", "hf_final")
REPLACED_ON_OVERWRITE = (*RUN_OUTPUTS, "hf", "tensorboard", "rollouts", WANDB_RUN_ID_FILE)


class OutputDirError(UserError):
    """``trainer.output_dir`` belongs to another run (live, or finished without a checkpoint to resume)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class OutputLock:
    """``output_dir/.megatron-dapo.lock`` holding ``<host> <pid> <Slurm job id or ->`` of the run that owns the
    folder."""

    def __init__(self, output_dir: str | Path) -> None:
        """Take the lock, or raise ``OutputDirError`` naming the live owner. A stale lock is taken over with a
        one-line notice: its pid is dead on this host, or it is this Slurm job's (a requeued job restarts, maybe
        on another node, only once its earlier run has ended). The file appears complete or not at all
        (``os.link``)."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / LOCK_FILE
        self.owner = f"{socket.gethostname()} {os.getpid()} {os.environ.get('SLURM_JOB_ID') or '-'}"
        staged = out / f"{LOCK_FILE}.{os.getpid()}"
        staged.write_text(self.owner + "\n")
        try:
            while True:
                try:
                    os.link(staged, self.path)
                    return
                except FileExistsError:
                    self._take_over_if_stale(out)
        finally:
            staged.unlink(missing_ok=True)

    def _take_over_if_stale(self, out: Path) -> None:
        try:
            fields = self.path.read_text().split()
        except FileNotFoundError:  # released meanwhile: try again
            return
        host, pid, job = (fields + ["?", "?", "-"][len(fields):])[:3]
        dead = host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid))
        requeued = job != "-" and job == os.environ.get("SLURM_JOB_ID")
        if dead or requeued:
            why = "no such process" if dead else f"an earlier run of Slurm job {job}"
            print(f"output: {self.path}: taking over the stale lock of pid {pid} on {host} ({why})", flush=True)
            self.path.unlink(missing_ok=True)
            return
        raise OutputDirError(
            f"trainer.output_dir={out} is in use by the run of pid {pid} on host {host} ({self.path}): wait for it "
            "to end or choose a new trainer.output_dir (delete the lock file only if that run is gone)"
        )

    def release(self) -> None:
        """Remove the lock if this process still holds it."""
        try:
            if self.path.read_text().strip() == self.owner:
                self.path.unlink()
        except FileNotFoundError:
            pass


def _checkpoint_files(save_dir: Path) -> list[Path]:
    if not save_dir.is_dir():
        return []
    return sorted([*save_dir.glob("iter_*"), *save_dir.glob(TRACKER_FILE)])


def claim_output_dir(trainer: TrainerConfig, save_dir: Path, hf_config: PretrainedConfig) -> None:
    """Refuse to start over another run's output; a resume must be of the same model; ``trainer.overwrite``
    removes the old output (saying what). Nothing is written unless the run may go on."""
    out = Path(trainer.output_dir)
    found = [name for name in RUN_OUTPUTS if (out / name).exists()]
    checkpoints = _checkpoint_files(save_dir)
    saved = saved_iterations(save_dir) if checkpoints else []  # newest first, each with why it cannot be resumed
    if trainer.resume == "strict" and saved and saved[0][1] is not None:  # before toy model or config.yaml change
        raise strict_resume_refusal(*saved[0])
    latest = next((folder for folder, problem in saved if problem is None), None)
    if not found and not checkpoints:
        return
    if trainer.overwrite:
        removed = [out / name for name in REPLACED_ON_OVERWRITE if (out / name).exists()] + checkpoints
        for path in removed:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        print(f"output: trainer.overwrite=true: removed {', '.join(str(path) for path in removed)}", flush=True)
        return
    if trainer.resume and latest is not None:
        saved_config = latest / HF_CONFIG_DIR
        if saved_config.is_dir():  # a resume of another model is refused before config.yaml or the toy model changes
            check_same_model(hf_config, AutoConfig.from_pretrained(saved_config), f"checkpoint {latest}")
        return
    why = "trainer.resume=false" if latest is not None else f"no checkpoint to resume in {save_dir}"
    held = ", ".join(found + ([f"{save_dir}/iter_*"] if checkpoints else []))
    raise OutputDirError(
        f"trainer.output_dir={out} holds another run's output ({held}) and {why}: set trainer.resume=true with its "
        "checkpoint, choose a new trainer.output_dir, or set trainer.overwrite=true to replace it"
    )
