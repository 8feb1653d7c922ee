"""``report.png``: a run's curves drawn from its ``metrics.jsonl`` (``megatron-dapo report <output_dir>``).

The panels follow the DAPO paper: accuracy, reward, entropy and response length (its Figure 7), the clip
fractions and the probability of up-clipped tokens (Figure 3a), then dynamic sampling, held-out evaluation and
where the time goes. Only the file is read, so a report can be drawn of a finished run, of one still running (a
half-written last line is skipped) or away from the training machine. Keys a run did not log leave their panel
empty; rows may be sparse (evaluation rows hold only ``eval/*`` keys, possibly at step 0).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from megatron_dapo.errors import UserError

REPORT_FILE = "report.png"
# The phases of a step, stacked in the timing panel; timing/step (their total) and other timing/* keys are lines.
STEP_PHASES = ("timing/generate", "timing/old_logprob", "timing/train", "timing/sync")


@dataclass(frozen=True)
class Panel:
    """One plot: the keys it draws, or every key starting with ``prefix``."""

    title: str
    keys: tuple[str, ...] = ()
    prefix: str | None = None
    log_scale: bool = False


PANELS = (
    Panel("accuracy (acc/mean)", ("acc/mean",)),
    Panel("reward", ("reward/mean",)),
    Panel("entropy of the policy", ("entropy/mean", "entropy/trained_mean")),
    Panel("response length [tokens]", ("response_length/mean", "response_length/max")),
    Panel("clipped tokens (fraction)", ("pg_clipfrac/high", "pg_clipfrac/low", "pg_clipfrac/dual")),
    Panel("mean π of tokens", ("prob/up_clipped_mean", "prob/mean")),
    Panel(
        "dynamic sampling and truncation",
        ("sampling/kept_group_frac", "sampling/wasted_token_frac", "sampling/zero_adv_token_frac",
         "response_length/clip_ratio", "reward/no_answer_frac"),
    ),
    Panel(
        "groups per step",
        ("sampling/generated_groups", "sampling/aborted_groups", "sampling/zero_std_all_correct",
         "sampling/zero_std_all_wrong"),
    ),
    Panel("generation batches per step", ("sampling/num_gen_batches",)),
    Panel("held-out evaluation", prefix="eval/"),
    Panel("engine vs actor |Δ log-prob|", ("rollout/train_logprob_abs_diff",), log_scale=True),
    Panel("time per step [s]", prefix="timing/"),
)


class ReportError(UserError, ValueError):
    """No metrics to draw: the message names the file."""


def read_metrics(path: str | Path) -> dict[int, dict[str, float]]:
    """Numeric metrics by step from a ``metrics.jsonl`` (rows of one step merged).

    Only a last line without its newline is skipped (the one a running trainer is writing); any other line that
    is not JSON is refused, naming file and line: a silently shortened curve would look like a real one.
    """
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"{path} not found: pass the trainer.output_dir of a run that has logged a step")
    by_step: dict[int, dict[str, float]] = {}
    text = path.read_text()
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines.pop()
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ReportError(f"{path}: line {number} is not JSON ({error.msg}); remove or repair that line") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            continue
        values = {
            key: float(value) for key, value in row.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        }
        by_step.setdefault(row["step"], {}).update(values)
    if not by_step:
        raise ReportError(f"{path} holds no metrics yet: the first step has not finished")
    return dict(sorted(by_step.items()))


def _series(metrics: dict[int, dict[str, float]], key: str) -> tuple[list[int], list[float]]:
    points = [(step, values[key]) for step, values in metrics.items() if key in values]
    return [step for step, _ in points], [value for _, value in points]


def _panel_keys(panel: Panel, keys: set[str]) -> list[str]:
    if panel.prefix is not None:
        return sorted(key for key in keys if key.startswith(panel.prefix))
    return [key for key in panel.keys if key in keys]


def _draw_timing(axes, metrics: dict[int, dict[str, float]], keys: list[str]) -> None:
    """The step's phases stacked (a missing phase counts 0), ``timing/step`` and the other timings as lines."""
    phases = [key for key in STEP_PHASES if key in keys]
    steps = [step for step, values in metrics.items() if any(key in values for key in phases)]
    if phases:
        stacks = [[metrics[step].get(key, 0.0) for step in steps] for key in phases]
        axes.stackplot(steps, stacks, labels=[key.removeprefix("timing/") for key in phases], alpha=0.7)
    for key in (key for key in keys if key not in phases):
        axes.plot(*_series(metrics, key), "k-" if key == "timing/step" else "--", label=key.removeprefix("timing/"))


def _draw(axes, panel: Panel, metrics: dict[int, dict[str, float]], keys: list[str]) -> None:
    axes.set_title(panel.title, fontsize=10)
    axes.set_xlabel("step", fontsize=8)
    axes.tick_params(labelsize=8)
    axes.grid(alpha=0.3)
    if not keys:
        axes.text(0.5, 0.5, "not logged", ha="center", va="center", transform=axes.transAxes, color="gray")
        return
    if panel.prefix == "timing/":
        _draw_timing(axes, metrics, keys)
    else:
        for key in keys:
            steps, values = _series(metrics, key)
            sparse = len(steps) == 1 or 2 * len(steps) < len(metrics)  # e.g. evaluations: mark the points
            axes.plot(steps, values, marker="o" if sparse else None, markersize=3, label=key)
    if panel.log_scale:
        axes.set_yscale("log")
    axes.legend(fontsize=7, loc="best")


def write_report(output_dir: str | Path, out: str | Path | None = None, dpi: int = 90) -> Path:
    """Draw ``output_dir/metrics.jsonl`` into ``out`` (default ``output_dir/report.png``); the path written."""
    output_dir = Path(output_dir)
    metrics = read_metrics(output_dir / "metrics.jsonl")
    keys = {key for values in metrics.values() for key in values}
    columns = 3
    rows = math.ceil(len(PANELS) / columns)
    figure = Figure(figsize=(4.4 * columns, 3.0 * rows), layout="constrained")
    figure.suptitle(f"{output_dir.resolve().name}: steps {min(metrics)}–{max(metrics)}")
    for panel, axes in zip(PANELS, figure.subplots(rows, columns).flat):
        _draw(axes, panel, metrics, _panel_keys(panel, keys))
    path = Path(out) if out is not None else output_dir / REPORT_FILE
    figure.savefig(path, dpi=dpi)
    return path
