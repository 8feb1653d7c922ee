"""DAPO's mechanisms one at a time on the countdown CPU task: one experiment per figure of the paper, each arm one
change from naive GRPO, every arm of a seed starting from the same warm start, compared by paired differences.

- Fig. 2, clip-higher: ε_high 0.2 / 0.28 / 0.5 with 16 updates per rollout, so that the policy drifts within a
  step and the upper clip binds; entropy and pass@k − avg@k over steps.
- Fig. 4, token-level loss: sequence-mean vs token-mean, overlong handling off and a limit nothing reaches, so
  that the teacher's long, mostly wrong rambles stay in the batch; length, rambling share, entropy.
- Fig. 5, overlong: none / filtering / filtering + soft punishment with a limit that cuts 12% of clean solutions;
  accuracy and truncation.
- Fig. 6, dynamic sampling: off / on where most groups have no reward spread; accuracy against steps and against
  generated tokens.

Writes ``<out>/figures.md`` (each arm's mean ± std over seeds, each arm's paired difference from naive GRPO with a
95% t interval) and ``<out>/fig*.png``; each run's ``train.log`` and ``metrics.jsonl`` under
``<out>/<figure>/seed<s>/<arm>/``, each seed's warm start under ``<out>/warm_start/seed<s>/``.

    python examples/ablation/figures.py --out outputs/figures --seeds 5 --jobs 2
    python examples/ablation/figures.py --out /tmp/figures --quick      # 1 seed, 1 step per arm: does it still work
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TASK_CONFIG = ROOT / "examples" / "configs" / "countdown_cpu.yaml"
# Every arm starts here (the paper's baseline); the task config's KL 0, dual clip (c = 10) and TIS cap (2) stay on.
NAIVE_GRPO = (
    "algorithm.clip_ratio_high=0.2",
    "algorithm.loss_agg_mode=seq-mean-token-mean",
    "algorithm.dynamic_sampling=false",
    "algorithm.overlong_filtering=false",
    "algorithm.overlong_buffer_enable=false",
)
# The teacher every warm start imitates (on top of the task config's 3% wrong steps): 40% of its worked
# countdowns ramble — one number said 2 to 30 times — and 80% of those lose count after it (long and mostly wrong);
# none loops without end, so a limit that no ramble reaches truncates nothing (Fig. 4). One warm start per seed,
# shared by every arm of every figure: arms differ by the algorithm only, and the pairing is by seed.
TEACHER = ("toy_model.sft_ramble=0.4", "toy_model.sft_ramble_repeats=30", "toy_model.sft_ramble_error=0.8",
           "toy_model.sft_loop=0.0")
FULL = ("trainer.max_steps=30", "trainer.eval_interval=10", "data.toy_num_val=32")
# --quick: does every arm still run; a short warm start, one step, tiny batches
QUICK = ("trainer.max_steps=1", "trainer.eval_interval=1", "toy_model.sft_steps=200", "data.toy_num_val=4",
         "rollout.val_n=2", "algorithm.train_batch_size=4", "algorithm.gen_batch_size=8", "algorithm.mini_batch_size=16",
         "algorithm.max_num_gen_batches=10", "parallel.micro_batch_size=8")
LAST_STEPS = 5  # per-step outcomes: the mean over the last steps
RAMBLE = re.compile(r"\b(\d+) \1\b")  # a number said twice in a row


@dataclass(frozen=True)
class Arm:
    label: str
    slug: str
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Series:
    """A curve of one run: ``read(run_dir) -> (x, y)``."""

    title: str
    read: Callable[[Path], tuple[list[float], list[float]]]
    x_label: str = "step"


@dataclass(frozen=True)
class Outcome:
    """A number per run, compared between arms: ``read(run_dir) -> value``."""

    label: str
    read: Callable[[Path], float]
    digits: int = 3


@dataclass(frozen=True)
class Figure:
    slug: str
    title: str
    setting: tuple[str, ...]  # on top of naive GRPO, for every arm: the task that gives the mechanism work
    arms: tuple[Arm, ...]  # the first one is naive GRPO in this setting: the others are paired with it
    panels: tuple[Series, ...]
    outcomes: tuple[Outcome, ...]
    checks: tuple[Outcome, ...]  # does the design give the mechanism something to act on (the baseline's runs)


# ---------------------------------------------------------------------------------------------- reading runs
@functools.cache  # the tables and plots read each run's file for every outcome and panel
def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def eval_key(rows: list[dict], kind: str) -> str:
    """``eval/<source>/<kind>@<k>`` with the largest k (``rollout.val_n``)."""
    keys = [key for row in rows for key in row if key.startswith("eval/") and f"/{kind}@" in key]
    return max(keys, key=lambda key: int(key.rsplit("@", 1)[1]))


def per_step(key: str) -> Callable[[Path], tuple[list[float], list[float]]]:
    def read(run_dir: Path) -> tuple[list[float], list[float]]:
        rows = [row for row in metrics(run_dir) if row["step"] > 0 and key in row]
        return [row["step"] for row in rows], [row[key] for row in rows]
    return read


def held_out(kind: str = "avg", minus_avg: bool = False, x: str = "step") -> Callable[[Path], tuple[list, list]]:
    """Held-out avg@k or pass@k (minus avg@k) at each evaluation, against the step or the tokens generated so far."""
    def read(run_dir: Path) -> tuple[list[float], list[float]]:
        rows = metrics(run_dir)
        key, avg = eval_key(rows, kind), eval_key(rows, "avg")
        xs, ys, tokens = [], [], 0.0
        for row in rows:
            tokens += row.get("sampling/generated_tokens", 0.0)
            if key in row:
                xs.append(row["step"] if x == "step" else tokens)
                ys.append(row[key] - (row[avg] if minus_avg else 0.0))
        return xs, ys
    return read


@functools.cache
def dump_rows(run_dir: Path) -> dict[int, list[dict]]:
    """The rollout dumps (``logging.rollout_dump_interval``), by step."""
    dumps = {}
    for path in (run_dir / "rollouts").glob("step_*.jsonl"):
        dumps[int(path.stem.split("_")[1])] = [json.loads(line) for line in path.read_text().splitlines()]
    return dict(sorted(dumps.items()))


def rambling_share(run_dir: Path) -> tuple[list[float], list[float]]:
    """Per step, the share of responses that say a number twice in a row."""
    dumps = dump_rows(run_dir)
    return list(dumps), [sum(bool(RAMBLE.search(r["response"])) for r in rows) / len(rows) for rows in dumps.values()]


def length_spread(run_dir: Path) -> float:
    """Mean over the first dumped step's groups of their response lengths' coefficient of variation."""
    rows = next(iter(dump_rows(run_dir).values()))
    groups: dict[int, list[int]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row["length"])
    return sum(_std(lengths) / _mean(lengths) for lengths in groups.values()) / len(groups)


def last(series: Callable[[Path], tuple[list, list]], count: int | None = LAST_STEPS) -> Callable[[Path], float]:
    """The mean of a series' last ``count`` points (1: its final value; ``None``: all of them)."""
    return lambda run_dir: _mean(series(run_dir)[1][-count:] if count else series(run_dir)[1])


def first(key: str) -> Callable[[Path], float]:
    return lambda run_dir: next(row[key] for row in metrics(run_dir) if row["step"] > 0)


def total(key: str) -> Callable[[Path], float]:
    return lambda run_dir: sum(row.get(key, 0.0) for row in metrics(run_dir))


def zero_spread_share(run_dir: Path) -> float:
    """Share of the first step's generated groups whose samples are all right or all wrong."""
    row = next(row for row in metrics(run_dir) if row["step"] > 0)
    same = row["sampling/zero_std_all_correct"] + row["sampling/zero_std_all_wrong"]
    return same / row["sampling/generated_groups"]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _std(values: list[float]) -> float:
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))


# ---------------------------------------------------------------------------------------------- the figures
AVG = Outcome("held-out avg@k (last eval)", last(held_out("avg"), 1))
FIGURES = (
    Figure(
        "fig2_clip_higher", "Fig. 2 — clip-higher",
        # 16 updates per rollout (update batch 8 samples of 128, one epoch): the policy drifts within a step
        ("algorithm.mini_batch_size=8", "parallel.micro_batch_size=8", "optimizer.lr=2e-4"),
        (Arm("ε_high = 0.2 (naive GRPO)", "eps0.2"), Arm("ε_high = 0.28 (DAPO)", "eps0.28", ("algorithm.clip_ratio_high=0.28",)),
         Arm("ε_high = 0.5", "eps0.5", ("algorithm.clip_ratio_high=0.5",))),
        (Series("entropy/mean (every response)", per_step("entropy/mean")),
         Series("held-out pass@k − avg@k", held_out("pass", minus_avg=True)),
         Series("held-out avg@k", held_out("avg")),
         Series("pg_clipfrac/high", per_step("pg_clipfrac/high"))),
        (AVG, Outcome("pass@k − avg@k (last eval)", last(held_out("pass", minus_avg=True), 1)),
         Outcome("entropy/mean (last 5 steps)", last(per_step("entropy/mean"))),
         Outcome("pg_clipfrac/high (last 5 steps)", last(per_step("pg_clipfrac/high")), 4)),
        (Outcome("actor/ppo_kl (mean over steps)", last(per_step("actor/ppo_kl"), None), 4),
         Outcome("pg_clipfrac/high (mean over steps)", last(per_step("pg_clipfrac/high"), None), 4)),
    ),
    Figure(
        "fig4_token_level_loss", "Fig. 4 — token-level loss",
        # nothing truncates (the longest rambles stay near 200 tokens), every response dumped for the rambling share
        ("rollout.max_response_length=224", "logging.rollout_dump_interval=1"),
        (Arm("sequence-mean (naive GRPO)", "seq_mean"), Arm("token-mean (DAPO)", "token_mean",
                                                             ("algorithm.loss_agg_mode=token-mean",))),
        (Series("response_length/mean", per_step("response_length/mean")),
         Series("rambling share (a number twice in a row)", rambling_share),
         Series("entropy/mean (every response)", per_step("entropy/mean")),
         Series("held-out avg@k", held_out("avg"))),
        (AVG, Outcome("response length (last 5 steps)", last(per_step("response_length/mean")), 1),
         Outcome("rambling share (last 5 steps)", last(rambling_share)),
         Outcome("entropy/mean (last 5 steps)", last(per_step("entropy/mean")))),
        (Outcome("within-group length CV (step 1)", length_spread),
         Outcome("rambling share (step 1)", lambda run_dir: rambling_share(run_dir)[1][0]),
         Outcome("truncated share (step 1)", first("response_length/clip_ratio"))),
    ),
    Figure(
        "fig5_overlong", "Fig. 5 — overlong filtering and soft punishment",
        # 64 tokens cut 12.3% of the clean worked countdowns; the buffer is the paper's 20% of the limit
        ("rollout.max_response_length=64", "algorithm.overlong_buffer_len=12"),
        (Arm("none (naive GRPO)", "none"), Arm("overlong filtering", "filtering", ("algorithm.overlong_filtering=true",)),
         Arm("filtering + soft punishment (DAPO)", "filtering_soft",
             ("algorithm.overlong_filtering=true", "algorithm.overlong_buffer_enable=true"))),
        (Series("held-out avg@k", held_out("avg")),
         Series("truncated share (response_length/clip_ratio)", per_step("response_length/clip_ratio")),
         Series("response_length/mean", per_step("response_length/mean"))),
        (AVG, Outcome("truncated share (last 5 steps)", last(per_step("response_length/clip_ratio"))),
         Outcome("response length (last 5 steps)", last(per_step("response_length/mean")), 1)),
        (Outcome("truncated share (step 1)", first("response_length/clip_ratio")),),
    ),
    Figure(
        "fig6_dynamic_sampling", "Fig. 6 — dynamic sampling",
        # sampling at temperature 0.3 makes most groups all right or all wrong (measured on a warm start: 69% of
        # groups, against 2% at 1.0); evaluation stays at 1.0. Dynamic sampling draws until the batch is full, as in
        # the paper: near 0.95 accuracy a step needs more than 8 generation batches
        ("rollout.temperature=0.3", "algorithm.max_num_gen_batches=0"),
        (Arm("off (naive GRPO)", "off"), Arm("dynamic sampling (DAPO)", "on", ("algorithm.dynamic_sampling=true",))),
        (Series("held-out avg@k", held_out("avg")),
         Series("held-out avg@k", held_out("avg", x="tokens"), x_label="generated tokens"),
         Series("sampling/zero_adv_token_frac", per_step("sampling/zero_adv_token_frac"))),
        (AVG, Outcome("generated tokens (run)", total("sampling/generated_tokens"), 0)),
        (Outcome("groups without reward spread (step 1)", zero_spread_share),),
    ),
)


# ---------------------------------------------------------------------------------------------- running
@dataclass(frozen=True)
class Run:
    figure: Figure
    arm: Arm
    seed: int

    def folder(self, out: Path) -> Path:
        return out / self.figure.slug / f"seed{self.seed}" / self.arm.slug


WARM_START = """
import sys
from megatron_dapo.config import load_config
from megatron_dapo.inputs import build_toy_warm_start, training_files
config = load_config(sys.argv[1], sys.argv[3:])
build_toy_warm_start(config, training_files(config), sys.argv[2])
"""


def warm_start(out: Path, seed: int, size: tuple[str, ...], extra: list[str]) -> Path:
    """The seed's warm start (the policy a run of these settings would build for itself), built once in a process
    of its own and moved into place when complete; ``<out>/warm_start/seed<s>``."""
    folder = out / "warm_start" / f"seed{seed}"
    if (folder / "config.json").is_file():
        return folder
    building = out / "warm_start" / f"seed{seed}.building"
    shutil.rmtree(building, ignore_errors=True)
    overrides = [*size, *TEACHER, f"trainer.seed={seed}", f"trainer.output_dir={building}", *extra]
    result = subprocess.run([sys.executable, "-c", WARM_START, str(TASK_CONFIG), str(building / "toy_init"), *overrides],
                            cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"figures: the warm start of seed {seed} failed: {result.stderr.strip()[-2000:]}")
    (building / "toy_init").rename(folder)
    shutil.rmtree(building)
    print(f"figures: warm start of seed {seed} built", flush=True)
    return folder


def train(run: Run, out: Path, model: Path, size: tuple[str, ...], extra: list[str], threads: int) -> Path:
    """One ``megatron-dapo train`` process from the seed's warm start; its folder. A finished run (its ``done``
    file) is not repeated, so an interrupted experiment goes on where it stopped."""
    run_dir = run.folder(out)
    if (run_dir / "done").is_file():
        return run_dir
    command = [
        sys.executable, "-m", "megatron_dapo", "train", "--config", str(TASK_CONFIG), *NAIVE_GRPO, *size,
        *TEACHER, *run.figure.setting, *run.arm.overrides, f"trainer.seed={run.seed}", f"model.hf_path={model}",
        f"trainer.output_dir={run_dir}", "logging.progress_bar=false", "trainer.overwrite=true", "trainer.export_hf=false",
        *extra,
    ]  # an interrupted run (no done file) starts over: trainer.overwrite
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with (run_dir / "train.log").open("w") as log:
        result = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"figures: {run.figure.slug} {run.arm.slug} seed {run.seed} failed (exit {result.returncode}): "
                         f"see {run_dir / 'train.log'}")
    (run_dir / "done").touch()
    print(f"figures: done {run.figure.slug} {run.arm.slug} seed {run.seed}", flush=True)
    return run_dir


def run_all(out: Path, figures: tuple[Figure, ...], seeds: range, size: tuple[str, ...], extra: list[str],
            jobs: int) -> None:
    """Every seed's warm start, then every run, ``jobs`` at a time in that order: a run waits for its seed's warm
    start only, so runs of the first seeds overlap the later seeds' warm starts. Runs get ``cores / jobs`` threads;
    the warm start takes two whatever it is given (toy/toy_model.py: its weights must not depend on it)."""
    threads = max(1, (os.cpu_count() or 2) // jobs)
    built = {seed: Future() for seed in seeds}

    def build(seed: int) -> None:
        try:
            built[seed].set_result(warm_start(out, seed, size, extra))
        except BaseException as error:  # the runs of this seed fail with it
            built[seed].set_exception(error)
            raise

    runs = [Run(figure, arm, seed) for seed in seeds for figure in figures for arm in figure.arms]
    with ThreadPoolExecutor(jobs) as pool:
        tasks = [pool.submit(build, seed) for seed in seeds]
        tasks += [pool.submit(lambda run=run: train(run, out, built[run.seed].result(), size, extra, threads))
                  for run in runs]
        for task in tasks:
            task.result()


# ---------------------------------------------------------------------------------------------- statistics
def paired_difference(values: list[float], baseline: list[float]) -> tuple[float, float, float]:
    """Mean of the per-seed differences and its 95% t interval (``nan`` bounds with one seed)."""
    from scipy import stats

    differences = [v - b for v, b in zip(values, baseline)]
    mean = _mean(differences)
    if len(differences) < 2:
        return mean, float("nan"), float("nan")
    half = stats.t.ppf(0.975, len(differences) - 1) * _std(differences) / math.sqrt(len(differences))
    return mean, mean - half, mean + half


def figure_table(figure: Figure, out: Path, seeds: range) -> list[str]:
    """The figure's section of ``figures.md``: design checks, each arm's outcomes, paired differences."""
    folders = {arm.slug: [Run(figure, arm, seed).folder(out) for seed in seeds] for arm in figure.arms}
    values = {(arm.slug, o.label): [o.read(d) for d in folders[arm.slug]] for arm in figure.arms for o in figure.outcomes}
    baseline = figure.arms[0]
    lines = [f"### {figure.title}", "", f"Setting (every arm, on naive GRPO): `{' '.join(figure.setting)}`; "
             f"{len(seeds)} seed(s).", ""]
    checks = "; ".join(f"{c.label} {_fmt([c.read(d) for d in folders[baseline.slug]], c.digits)}" for c in figure.checks)
    lines += [f"Design check (naive arm, mean ± std over seeds): {checks}.", ""]
    lines += ["| arm | " + " | ".join(o.label for o in figure.outcomes) + " |",
              "|---" * (len(figure.outcomes) + 1) + "|"]
    for arm in figure.arms:
        cells = [_fmt(values[arm.slug, o.label], o.digits) for o in figure.outcomes]
        lines.append(f"| {arm.label} | " + " | ".join(cells) + " |")
    for arm in figure.arms[1:]:
        cells = []
        for o in figure.outcomes:
            mean, low, high = paired_difference(values[arm.slug, o.label], values[baseline.slug, o.label])
            if math.isnan(low):
                cells.append(f"{mean:+.{o.digits}f} (one seed: no interval)")
                continue
            verdict = "**significant**" if low > 0 or high < 0 else "not significant"
            cells.append(f"{mean:+.{o.digits}f} [{low:+.{o.digits}f}, {high:+.{o.digits}f}] {verdict}")
        lines.append(f"| Δ {arm.slug} − {baseline.slug} (paired, 95% CI) | " + " | ".join(cells) + " |")
    return lines + [""]


def _fmt(values: list[float], digits: int) -> str:
    return f"{_mean(values):.{digits}f} ± {_std(values) if len(values) > 1 else 0.0:.{digits}f}"


def plot_figure(figure: Figure, out: Path, seeds: range) -> Path:
    """``<out>/<figure>.png``: each panel's curve per arm, mean over seeds with a ±1 standard-error band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = figure.panels
    plot, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2))
    for axis, series in zip(axes, panels):
        for arm in figure.arms:
            curves = [series.read(Run(figure, arm, seed).folder(out)) for seed in seeds]
            points = min(len(x) for x, _ in curves)
            xs = [_mean([x[i] for x, _ in curves]) for i in range(points)]
            ys = [[y[i] for _, y in curves] for i in range(points)]
            means = [_mean(column) for column in ys]
            errors = [_std(column) / math.sqrt(len(column)) if len(column) > 1 else 0.0 for column in ys]
            axis.plot(xs, means, marker="o" if points <= 12 else None, markersize=3, label=arm.label)
            axis.fill_between(xs, [m - e for m, e in zip(means, errors)], [m + e for m, e in zip(means, errors)],
                              alpha=0.2)
        axis.set_title(series.title, fontsize=10)
        axis.set_xlabel(series.x_label)
    axes[0].legend(fontsize=8)
    plot.suptitle(f"{figure.title} (countdown CPU task, {len(seeds)} seed(s), mean ± 1 s.e.)")
    plot.tight_layout()
    path = out / f"{figure.slug}.png"
    plot.savefig(path, dpi=80)
    plt.close(plot)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the runs, figures.md and the plots")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per arm (trainer.seed 1..N; also the warm start's)")
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 step per arm, small batches, short warm start")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each with cores/jobs threads)")
    parser.add_argument("--only", default=None, help="comma-separated figure slugs to run (default: all)")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every run, key.sub=value")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    figures = tuple(f for f in FIGURES if args.only is None or f.slug in args.only.split(","))
    if not figures:
        raise SystemExit(f"figures: --only {args.only} names no figure; choose from "
                         f"{', '.join(f.slug for f in FIGURES)}")
    seeds = range(1, (1 if args.quick else args.seeds) + 1)
    run_all(out, figures, seeds, QUICK if args.quick else FULL, args.overrides, args.jobs)
    report = [f"# DAPO's mechanisms on the countdown CPU task ({'--quick' if args.quick else 'full'} run)", ""]
    for figure in figures:
        report += figure_table(figure, out, seeds)
        report.append(f"![{figure.title}]({plot_figure(figure, out, seeds).name})")
        report.append("")
    path = out / "figures.md"
    path.write_text("\n".join(report))
    print(path.read_text(), end="")
    print(f"figures: {path}")


if __name__ == "__main__":
    main()
