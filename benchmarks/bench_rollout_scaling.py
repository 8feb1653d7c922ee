"""Rollout across the job: generated tokens per second with two engines against one, over the same two processes.

All runs are 2-process ``torchrun`` jobs on this host with the toy policy (fixed weights: rollout only) and the
same work per step (rounds of ``gen_batch_size`` prompts, no dynamic sampling), threads per process set so the
two cores are never oversubscribed:

- one engine spanning both processes (``rollout.ranks_per_engine=2``), one thread per process — torchrun's
  default for its workers, and how the single engine on rank 0 ran before engines spanned the job;
- the same engine given both cores' threads while the other process waits;
- an engine in each process (``rollout.ranks_per_engine=1``), one thread each.

The last line compares two engines with one engine at the same threads per process; the line before it, with
the single engine that has both cores.

``--long-tail``: two engines (one per process, one thread each) fed continuously against in lock-step ticks
(``rollout.continuous_feeding``), streaming on the countdown task, whose warm start imitates demonstrations that
loop without end (``toy_model.sft_loop``): the few samples that loop generate to ``max_response_length`` (256
here; solutions take 14–110 tokens) and hold their engine's batch (the CPU engine batches statically) while the
other engine could go on. One group in flight per engine, 8 kept groups per step. The last line is ``continuous/ticks generation_seconds ratio=<z>``: the steps' generation
time, the same steps and kept groups in both.

    python benchmarks/bench_rollout_scaling.py            # 4 steps per run
    python benchmarks/bench_rollout_scaling.py --quick    # 1 step, a shorter warm start
    python benchmarks/bench_rollout_scaling.py --long-tail [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from toy_rollout import ROOT, build_policy  # noqa: E402

PROMPTS = 128  # per step: enough rows (1024) that generation is compute-bound, not per-step overhead
ONE, ONE_ALL_CORES, TWO = "1 engine", "1 engine with both cores' threads", "2 engines"
RUNS = {
    ONE: (["rollout.ranks_per_engine=2"], "1,1"),
    ONE_ALL_CORES: (["rollout.ranks_per_engine=2"], "2,1"),
    TWO: (["rollout.ranks_per_engine=1"], "1,1"),
}


COUNTDOWN = ROOT / "examples" / "configs" / "countdown_cpu.yaml"
FEEDING = {"continuous": "rollout.continuous_feeding=true", "ticks": "rollout.continuous_feeding=false"}


def long_tail(quick: bool) -> None:
    steps, sft_steps = (3, 400) if quick else (8, 800)
    common = ["rollout.ranks_per_engine=1", "rollout.sampling_mode=streaming", "rollout.groups_in_flight=2",
              "rollout.max_response_length=256", "algorithm.train_batch_size=8", "algorithm.gen_batch_size=8",
              "algorithm.max_num_gen_batches=0"]
    seconds, kept = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        policy, data = build_policy(Path(tmp), sft_steps, COUNTDOWN)
        for label, feeding in FEEDING.items():
            out = Path(tmp) / "result.json"
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                       str(HERE / "toy_rollout.py"), "--policy", str(policy), "--data", str(data), "--steps", str(steps),
                       "--out", str(out), "--threads", "1,1", "--config", str(COUNTDOWN), *common, feeding]
            subprocess.run(command, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
            rows = json.loads(out.read_text())
            seconds[label] = sum(row["sampling/generated_tokens"] / row["rollout/tokens_per_s"] for row in rows)
            kept[label] = [(row["acc/mean"], row["response_length/mean"]) for row in rows]
            idle = sum(row["rollout/engine_idle_frac"] for row in rows) / len(rows)
            clipped = sum(row["response_length/clip_ratio"] for row in rows) / len(rows)
            print(f"{label}: {seconds[label]:.1f} s generating {steps} steps, engines idle {idle:.1%} of the time, "
                  f"{clipped:.1%} of the trained samples at the length limit")
    assert kept["continuous"] == kept["ticks"], "the two protocols kept different groups"
    print(f"continuous/ticks generation_seconds ratio={seconds['continuous'] / seconds['ticks']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--long-tail", action="store_true")
    args = parser.parse_args()
    if args.long_tail:
        long_tail(args.quick)
        return
    steps, sft_steps = (1, 300) if args.quick else (4, 800)
    common = ["rollout.sampling_mode=rounds", "algorithm.dynamic_sampling=false", f"algorithm.gen_batch_size={PROMPTS}",
              f"algorithm.train_batch_size={PROMPTS}", "rollout.n=8"]
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        policy, data = build_policy(Path(tmp), sft_steps)
        for label, (overrides, threads) in RUNS.items():
            out = Path(tmp) / "result.json"
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                       str(HERE / "toy_rollout.py"), "--policy", str(policy), "--data", str(data), "--steps", str(steps),
                       "--out", str(out), "--threads", threads, *common, *overrides]
            env = dict(os.environ, OMP_NUM_THREADS="2")  # set per process by --threads
            subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            rows = json.loads(out.read_text())
            rates[label] = sum(row["sampling/generated_tokens"] for row in rows) / sum(
                row["sampling/generated_tokens"] / row["rollout/tokens_per_s"] for row in rows)
            print(f"{label} over 2 processes (threads {threads.replace(',', '+')}): {rates[label]:.0f} tokens/s")
    print(f"policy: toy warm start of {sft_steps} steps; {PROMPTS} prompts x G=8 per step; {steps} steps per run")
    print(f"engines 2/1 (one engine with both cores' threads) throughput_ratio={rates[TWO] / rates[ONE_ALL_CORES]:.3f}")
    print(f"engines 2/1 throughput_ratio={rates[TWO] / rates[ONE]:.3f}")


if __name__ == "__main__":
    main()
