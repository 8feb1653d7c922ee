"""Step metrics to ``metrics.jsonl``, TensorBoard and optionally Weights & Biases (global rank 0 only)."""

from __future__ import annotations

import json
import os
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from megatron_dapo.errors import ConfigError

WANDB_RUN_ID_FILE = "wandb_run_id"


class MetricsLogger:
    """Appends one JSON line per step and mirrors scalars to TensorBoard and, with ``wandb_project``, to W&B.

    A run resumed after step ``resumed_after`` drops what the earlier run logged for later steps (steps after
    its last checkpoint, which the resumed run repeats): ``metrics.jsonl`` and TensorBoard hold each step once.
    W&B's history cannot be rewritten, so a resumed run continues the earlier W&B run (its id is kept in
    ``output_dir/wandb_run_id``; ``resume="allow"``) and sends only the steps after the last one the earlier run
    logged: W&B's steps never go backwards, and for the repeated steps it keeps the earlier run's values (the
    same numbers, rollouts being deterministic, except ``timing/*``). A fresh run (``resumed_after=None``) drops
    everything, step 0 (the evaluation before training) included, and starts a new W&B run.
    """

    def __init__(
        self,
        output_dir: str | Path,
        tensorboard: bool = True,
        resumed_after: int | None = None,
        wandb_project: str | None = None,
        wandb_run_name: str | None = None,
        run_config: dict | None = None,
    ) -> None:
        """``wandb_run_name`` defaults to ``output_dir``'s folder name; ``run_config`` becomes the W&B run's config."""
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept_through = -1 if resumed_after is None else resumed_after
        logged_through = -1  # the last step an earlier run logged here
        if self.path.exists():
            rows = [(line, json.loads(line)["step"]) for line in self.path.read_text().splitlines()]
            logged_through = max((step for _, step in rows), default=-1)
            self.path.write_text("".join(line + "\n" for line, step in rows if step <= kept_through))
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard discards this run directory's events at and after the step
            self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"), purge_step=kept_through + 1)
        self.wandb_run, self.wandb_after = None, kept_through
        if wandb_project is not None:
            id_file = Path(output_dir) / WANDB_RUN_ID_FILE
            if resumed_after is not None and id_file.is_file():
                self.wandb_after = max(kept_through, logged_through)
            else:
                id_file.write_text(uuid.uuid4().hex[:12])
            self.wandb_run = _start_wandb_run(
                output_dir, wandb_project, wandb_run_name, id_file.read_text().strip(), run_config or {}
            )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()
        if self.wandb_run is not None and step > self.wandb_after:
            self.wandb_run.log(metrics, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _start_wandb_run(output_dir: str | Path, project: str, name: str | None, run_id: str, config: dict):
    """The W&B run (``resume="allow"``: continued when ``run_id`` exists); its local files go to
    ``output_dir/wandb`` unless ``WANDB_DIR`` says otherwise."""
    import wandb

    try:
        return wandb.init(
            project=project,
            name=name or Path(output_dir).resolve().name,
            id=run_id,
            resume="allow",
            config=config,
            dir=os.environ.get("WANDB_DIR") or str(output_dir),
        )
    except wandb.errors.Error as error:  # no credentials, no server, a bad project name
        raise ConfigError(
            f"logging.wandb=true: W&B could not start the run ({error}); log in (`wandb login` or WANDB_API_KEY), "
            "set WANDB_MODE=offline to sync later, or set logging.wandb=false"
        ) from None


@contextmanager
def timed(metrics: dict[str, float], name: str) -> Iterator[None]:
    """Record the wall time of a block as ``timing/<name>`` seconds."""
    start = time.perf_counter()
    yield
    metrics[f"timing/{name}"] = time.perf_counter() - start
