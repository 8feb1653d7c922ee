"""Data-parallel balance: the cost-balanced partition (``parallel.balance_data=true``) against consecutive slices.

1. **Modelled, at cluster scale.** DP 8 × 64 samples per rank per mini-batch (512 = 32 prompts × 16 samples,
   group-major as the trainer orders them), Qwen2.5-32B's hidden size for the attention term, 16 mini-batches.
   Lengths follow a DAPO-like step: prompts of 100–400 tokens; each prompt has a difficulty that scales its
   samples' response lengths (log-normal around it: most responses a few hundred to a few thousand tokens, a
   long tail), and a response that reaches the 20,480-token limit is truncated there (the spike at the limit,
   about 6% of samples). For each partition: the slowest rank's estimated cost over the mean, summed over
   mini-batches (``batch.cost_imbalance``).
2. **Measured, the real actor.** DP2 under ``torchrun`` on this machine (one thread per process), a toy Qwen2
   and one mini-batch of two groups of 8 samples, one group long (≈ 480 tokens) and one short (≈ 40), the
   skew group-major slicing gives one rank all of; the median ``train_step`` time over several steps, balanced
   against consecutive.

    python benchmarks/bench_dp_balance.py            # last line: balanced/consecutive max_over_mean_cost ratio=<x>
    python benchmarks/bench_dp_balance.py --quick    # fewer timed steps

The measured ratio is printed first (``balanced/consecutive train_step_seconds ratio=<y>``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from megatron_dapo.batch import cost_imbalance, data_parallel_partition, sample_cost

DP, PER_RANK, GROUP, MINI_BATCHES, LIMIT, HIDDEN = 8, 64, 16, 16, 20480, 5120


def dapo_like_lengths(generator: np.random.Generator) -> tuple[list[int], float]:
    """One step's prompt + response lengths, group-major (see the module docstring), and the share truncated."""
    lengths, truncated = [], 0
    for _ in range(DP * PER_RANK * MINI_BATCHES // GROUP):
        prompt = int(generator.integers(100, 400))
        difficulty = generator.lognormal(np.log(3500), 1.0)  # the prompt's typical response length
        responses = generator.lognormal(np.log(difficulty), 0.6, GROUP).astype(int).clip(20, LIMIT)
        lengths += [prompt + int(r) for r in responses]
        truncated += int((responses == LIMIT).sum())
    return lengths, truncated / len(lengths)


def modelled() -> tuple[float, float]:
    lengths, at_limit = dapo_like_lengths(np.random.default_rng(0))
    costs = [sample_cost(length, HIDDEN) for length in lengths]
    mini_batch = DP * PER_RANK
    imbalance = {balance: cost_imbalance(costs, data_parallel_partition(costs, mini_batch, DP, balance), mini_batch)
                 for balance in (False, True)}
    print(f"modelled: DP {DP} × {PER_RANK} samples per rank, {MINI_BATCHES} mini-batches, median length "
          f"{int(np.median(lengths))}, {at_limit:.1%} at the {LIMIT}-token limit")
    print(f"  consecutive max/mean cost {imbalance[False]:.3f}   balanced {imbalance[True]:.3f}")
    return imbalance[True], imbalance[False]


def skewed_batch(hidden: int) -> tuple[dict, list[float]]:
    """One mini-batch, group-major: a group of 8 long samples (≈ 480 tokens), then one of 8 short ones (≈ 40)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    lengths = [int(x) for x in torch.randint(440, 480, (8,), generator=generator)]
    lengths += [int(x) for x in torch.randint(30, 40, (8,), generator=generator)]
    prompt, width = 20, max(lengths)
    input_ids = torch.randint(2, 1000, (len(lengths), width), generator=generator)
    loss_mask = torch.zeros(len(lengths), width)
    for row, length in enumerate(lengths):
        loss_mask[row, prompt - 1 : length - 1] = 1
        input_ids[row, length:] = 0
    batch = {
        "input_ids": input_ids,
        "labels": torch.cat([input_ids[:, 1:], torch.zeros(len(lengths), 1, dtype=torch.long)], dim=1),
        "loss_mask": loss_mask,
        "advantages": torch.randn(len(lengths), 1, generator=generator).expand(-1, width).contiguous(),
        "old_logprobs": -7.0 + 0.1 * torch.randn(len(lengths), width, generator=generator),
    }
    return batch, [sample_cost(length, hidden) for length in lengths]


def worker(work: Path, out: Path, steps: int, balance: bool) -> None:
    """One rank of the DP2 job (run by torchrun): ``steps`` timed optimiser steps after a warm-up one."""
    import time

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megatron_dapo.actor.actor import MegatronActor
    from megatron_dapo.config import load_config
    from megatron_dapo.distributed import initialize_distributed

    initialize_distributed(1, 1, seed=0)
    hf_dir = work / "model"
    if dist.get_rank() == 0 and not hf_dir.exists():
        Qwen2ForCausalLM(Qwen2Config(vocab_size=1000, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                                     num_attention_heads=8, num_key_value_heads=2)).save_pretrained(hf_dir)
    dist.barrier()
    config = load_config(None, ["parallel.micro_batch_size=4", "optimizer.lr_warmup_steps=0",
                                f"parallel.balance_data={balance}", "algorithm.mini_batch_size=16"])
    actor = MegatronActor(str(hf_dir), config.model, config.parallel, config.optimizer, config.policy_loss(),
                          total_steps=steps + 1)
    batch, costs = skewed_batch(256)
    partition = data_parallel_partition(costs, len(costs), 2, balance)
    local = {key: value[partition[parallel_state.get_data_parallel_rank()]] for key, value in batch.items()}
    times = []
    for _ in range(steps + 1):
        dist.barrier()
        start = time.perf_counter()
        actor.train_step(local)
        elapsed = torch.tensor(time.perf_counter() - start)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step ends when its slowest rank does
        times.append(elapsed.item())
    if dist.get_rank() == 0:
        out.write_text(json.dumps({"median_step_seconds": float(np.median(times[1:])),
                                   "imbalance": cost_imbalance(costs, partition, len(costs))}))


def measured(steps: int) -> tuple[float, float]:
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, balance in (("consecutive", False), ("balanced", True)):
            out = Path(tmp) / f"{label}.json"
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                       str(Path(__file__).resolve()), "--worker", "--work", tmp, "--out", str(out), "--steps", str(steps)]
            if balance:
                command.append("--balance")
            env = dict(os.environ, OMP_NUM_THREADS="1")
            subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            result = json.loads(out.read_text())
            seconds[label] = result["median_step_seconds"]
            print(f"measured, {label}: train_step {seconds[label]:.3f} s (median of {steps}), estimated max/mean "
                  f"cost {result['imbalance']:.3f}")
    return seconds["balanced"], seconds["consecutive"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--balance", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.work, args.out, args.steps, args.balance)
        return
    balanced_s, consecutive_s = measured(3 if args.quick else 8)
    print(f"balanced/consecutive train_step_seconds ratio={balanced_s / consecutive_s:.3f}")
    balanced, consecutive = modelled()
    print(f"balanced/consecutive max_over_mean_cost ratio={balanced / consecutive:.3f}")


if __name__ == "__main__":
    main()
