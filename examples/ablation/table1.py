"""DAPO's Table 1 ablation ladder on the countdown CPU task (examples/configs/countdown_cpu.yaml).

Six rows, each adding one technique to the row above, as in the paper (AIME24 avg@32 of Qwen2.5-32B):
naive GRPO 30 → +overlong filtering 36 → +clip-higher 38 → +soft overlong punishment 41 → +token-level loss 42
→ +dynamic sampling 50. Every row is a list of config overrides on the same task config; each seed's warm
start is built once (by the first row) and shared by the other rows of that seed, so rows differ only by the
algorithm. Writes ``<out>/table1.md`` and ``<out>/curves.png``; per run, its ``train.log`` and the usual
``metrics.jsonl`` under ``<out>/seed<s>/<row>/``.

    python examples/ablation/table1.py --out outputs/table1 --seeds 3 --jobs 2
    python examples/ablation/table1.py --out /tmp/table1 --quick      # 2 steps per row: does it still work
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TASK_CONFIG = ROOT / "examples" / "configs" / "countdown_cpu.yaml"
NAIVE_GRPO = [
    "algorithm.clip_ratio_high=0.2",
    "algorithm.loss_agg_mode=seq-mean-token-mean",
    "algorithm.dynamic_sampling=false",
    "algorithm.overlong_filtering=false",
    "algorithm.overlong_buffer_enable=false",
]
# (name, slug, the override this row adds, the paper's AIME24 avg@32)
LADDER = [
    ("naive GRPO", "grpo", None, 30),
    ("+ overlong filtering", "overlong_filtering", "algorithm.overlong_filtering=true", 36),
    ("+ clip-higher", "clip_higher", "algorithm.clip_ratio_high=0.28", 38),
    ("+ soft overlong punishment", "soft_overlong", "algorithm.overlong_buffer_enable=true", 41),
    ("+ token-level loss", "token_level_loss", "algorithm.loss_agg_mode=token-mean", 42),
    ("+ dynamic sampling (DAPO)", "dynamic_sampling", "algorithm.dynamic_sampling=true", 50),
]
# --quick: 2 steps per row on small batches; a warm start just long enough that some groups have reward spread
# (dynamic sampling's row needs 4 of them within 10 generation rounds)
QUICK = ["trainer.max_steps=2", "trainer.eval_interval=1", "toy_model.sft_steps=300", "data.toy_num_val=4",
         "rollout.val_n=2", "algorithm.train_batch_size=4", "algorithm.gen_batch_size=8", "algorithm.mini_batch_size=16",
         "algorithm.max_num_gen_batches=10", "parallel.micro_batch_size=8"]
LAST_STEPS = 5  # "final" entropy, length, truncation and clip fraction: the mean over the last steps


def row_overrides(row: int) -> list[str]:
    """The overrides of ladder row ``row``: naive GRPO, then every technique up to this row (cumulative)."""
    added = [override for _, _, override, _ in LADDER[1 : row + 1]]
    return NAIVE_GRPO + added


def _run(out: Path, seed: int, row: int, extra: list[str], threads: int) -> Path:
    """One training run (a ``megatron-dapo train`` process); its output folder. A run that finished before (its
    ``done`` file exists) is not repeated: an interrupted ladder goes on where it stopped."""
    run_dir = out / f"seed{seed}" / LADDER[row][1]
    if (run_dir / "done").is_file():
        return run_dir
    warm_start = out / f"seed{seed}" / LADDER[0][1] / "toy_init"
    shared = [] if row == 0 else [f"model.hf_path={warm_start}"]
    # a run without its done file was interrupted: start it over (trainer.overwrite) instead of being refused
    command = [
        sys.executable, "-m", "megatron_dapo", "train", "--config", str(TASK_CONFIG), *row_overrides(row),
        f"trainer.seed={seed}", f"trainer.output_dir={run_dir}", "logging.progress_bar=false", "trainer.overwrite=true",
        *shared, *extra,
    ]
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with (run_dir / "train.log").open("w") as log:
        result = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(
            f"table1: {LADDER[row][0]}, seed {seed} failed (exit {result.returncode}): see {run_dir / 'train.log'}"
        )
    (run_dir / "done").touch()
    print(f"table1: done {LADDER[row][0]}, seed {seed}", flush=True)
    return run_dir


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))


def _eval_keys(rows: list[dict]) -> tuple[str, str, int]:
    """The avg@k and pass@k keys with the largest k (k = rollout.val_n), over all data sources."""
    ks = [int(key.rsplit("@", 1)[1]) for row in rows for key in row if key.startswith("eval/") and "/avg@" in key]
    source = next(key.split("/")[1] for row in rows for key in row if key.startswith("eval/") and "/avg@" in key)
    k = max(ks)
    return f"eval/{source}/avg@{k}", f"eval/{source}/pass@{k}", k


def summarize_run(run_dir: Path) -> dict[str, float]:
    """A run's numbers for the table: last evaluation, means over the last steps, total generated tokens."""
    rows = _rows(run_dir)
    avg_key, pass_key, k = _eval_keys(rows)
    evaluated = [row for row in rows if avg_key in row]
    steps = [row for row in rows if row["step"] > 0][-LAST_STEPS:]

    def last(key: str) -> float:
        return sum(row[key] for row in steps) / len(steps)

    return {
        "k": k,
        "avg": evaluated[-1][avg_key],
        "avg_start": evaluated[0][avg_key],
        "pass": evaluated[-1][pass_key],
        "entropy": last("entropy/mean"),
        "length": last("response_length/mean"),
        "truncated": last("response_length/clip_ratio"),
        "clip_high": last("pg_clipfrac/high"),
        "tokens": sum(row.get("sampling/generated_tokens", 0.0) for row in rows),
    }


def write_table(out: Path, runs: dict[int, list[Path]]) -> Path:
    """``table1.md``: one line per ladder row, mean ± std over seeds."""
    summaries = {row: [summarize_run(d) for d in dirs] for row, dirs in runs.items()}
    k = summaries[0][0]["k"]
    seeds = len(summaries[0])
    lines = [
        f"Countdown CPU task, {seeds} seed(s) per row; held-out avg@{k}/pass@{k} at the last evaluation "
        f"(the warm start scored {_fmt(*_mean_std([s['avg_start'] for s in summaries[0]]))}); entropy, length, "
        f"truncation and clip-high fraction: mean of the last {LAST_STEPS} steps; tokens: generated over the run.",
        "",
        f"| row | paper AIME24 avg@32 | avg@{k} | pass@{k} | entropy | response length | truncated | clip-high frac "
        "| generated tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row, (name, _, _, paper) in enumerate(LADDER):
        if row not in summaries:
            continue
        s = summaries[row]
        cells = [_fmt(*_mean_std([x[key] for x in s]), digits) for key, digits in
                 (("avg", 3), ("pass", 3), ("entropy", 3), ("length", 1), ("truncated", 3), ("clip_high", 4))]
        tokens = _mean_std([x["tokens"] for x in s])[0]
        lines.append(f"| {name} | {paper} | " + " | ".join(cells) + f" | {tokens / 1000:.0f}k |")
    path = out / "table1.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _fmt(mean: float, std: float, digits: int = 3) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def plot_curves(out: Path, runs: dict[int, list[Path]]) -> Path:
    """``curves.png``: held-out accuracy, entropy, response length and π of up-clipped tokens per step, one line
    per ladder row (mean over seeds): the paper's Figures 2, 3 and 7 in miniature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    for row, dirs in runs.items():
        seeds = [_rows(d) for d in dirs]
        avg_key = _eval_keys(seeds[0])[0]
        for axis, key in zip(axes, (avg_key, "entropy/mean", "response_length/mean", "prob/up_clipped_mean")):
            steps = sorted({r["step"] for r in seeds[0] if key in r})
            means = [sum(next(r[key] for r in rows if r["step"] == step) for rows in seeds) / len(seeds) for step in steps]
            axis.plot(steps, means, marker="o" if key == avg_key else None, markersize=3, label=LADDER[row][0])
            axis.set_title("held-out " + key.rsplit("/", 1)[1] if key == avg_key else key)
            axis.set_xlabel("step")
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    path = out / "curves.png"
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the runs, table1.md and curves.png")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per row (trainer.seed 1..N; also the warm start's)")
    parser.add_argument("--quick", action="store_true",
                        help="2 steps per row: small batches, a short warm start, 4 held-out problems")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each with 2/jobs threads)")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every run, key.sub=value")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    extra = (QUICK if args.quick else []) + args.overrides
    threads = max(1, (os.cpu_count() or 2) // args.jobs)
    seeds = range(1, args.seeds + 1)
    runs: dict[int, list[Path]] = {row: [] for row in range(len(LADDER))}
    # the first row of each seed builds the warm start the others use: one at a time, as it runs on two threads
    # whatever the process is given (toy/toy_model.py) and two at once would fight over the cores
    runs[0] = [_run(out, seed, 0, extra, os.cpu_count() or 2) for seed in seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        later = [(row, seed) for row in range(1, len(LADDER)) for seed in seeds]
        for (row, _), run_dir in zip(later, pool.map(lambda rs: _run(out, rs[1], rs[0], extra, threads), later)):
            runs[row].append(run_dir)
    table = write_table(out, runs)
    print(table.read_text(), end="")
    print(f"curves: {plot_curves(out, runs)}")
    print(f"table1: {table}")


if __name__ == "__main__":
    main()
