"""Step metrics to ``metrics.jsonl`` and TensorBoard (global rank 0 only)."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class MetricsLogger:
    """Appends one JSON line per step and mirrors scalars to TensorBoard.

    A run resumed after step ``resumed_after`` drops what the earlier run logged for later steps (steps after
    its last checkpoint, which the resumed run repeats): ``metrics.jsonl`` and TensorBoard hold each step once.
    A fresh run (``None``) drops everything, step 0 (the evaluation before training) included.
    """

    def __init__(self, output_dir: str | Path, tensorboard: bool = True, resumed_after: int | None = None) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept_through = -1 if resumed_after is None else resumed_after
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= kept_through]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard discards this run directory's events at and after the step
            self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"), purge_step=kept_through + 1)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@contextmanager
def timed(metrics: dict[str, float], name: str) -> Iterator[None]:
    """Record the wall time of a block as ``timing/<name>`` seconds."""
    start = time.perf_counter()
    yield
    metrics[f"timing/{name}"] = time.perf_counter() - start
