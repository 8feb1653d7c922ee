"""DAPO loss through ``model.loss_impl`` naive / fused / fused_linear: peak memory and time of forward+backward.

Each variant runs in its own child process (this script with ``--variant``) so that peaks do not mix; the
parent prints a table and ratios. Peak memory is the child's peak resident set size above its resident
size just before the workload (inputs, outputs, gradients and temporaries included; interpreter and
libraries excluded). Each variant computes what a training micro-batch computes — logits ``hidden @ W^T``,
per-token log-probs (and entropy), DAPO's token-mean clipped loss — and back-propagates it into ``hidden``
and ``W`` (fp32 on CPU, one timed iteration).

    python benchmarks/bench_fused_loss.py            # 4096 tokens × vocab 152064 × hidden 1024, plus 16384-token scaling
    python benchmarks/bench_fused_loss.py --quick    # small sizes, seconds
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

VARIANTS = ("naive", "fused", "fused_linear")


def run_variant(variant: str, tokens: int, vocab: int, hidden_size: int, chunk_size: int) -> dict[str, float]:
    """Run one variant in this process; returns peak memory above the starting RSS (MB) and seconds."""
    from megatron_dapo.algorithm import PolicyLossConfig
    from megatron_dapo.ops import naive_logprobs_entropy, vocab_parallel_logprobs_entropy
    from megatron_dapo.ops.dapo_loss import dapo_loss_terms, fused_linear_dapo_loss_terms

    baseline_mb = psutil.Process().memory_info().rss / 2**20
    generator = torch.Generator().manual_seed(0)
    hidden = (torch.randn(1, tokens, hidden_size, generator=generator) * 0.5).requires_grad_(True)
    weight = (torch.randn(vocab, hidden_size, generator=generator) * 0.05).requires_grad_(True)
    labels = torch.randint(0, vocab, (1, tokens), generator=generator)
    batch = {
        "labels": labels,
        "loss_mask": torch.ones(1, tokens),
        "old_logprobs": -12.0 + torch.randn(1, tokens, generator=generator) * 0.1,
        "advantages": torch.randn(1, tokens, generator=generator),
    }
    loss_config = PolicyLossConfig(norm_length=tokens)
    start = time.perf_counter()
    if variant == "fused_linear":
        loss, count, sums = fused_linear_dapo_loss_terms(hidden, weight, batch, loss_config, vocab, None, chunk_size)
    else:
        op = naive_logprobs_entropy if variant == "naive" else vocab_parallel_logprobs_entropy
        logprob, _ = op(hidden @ weight.t(), labels, vocab)
        loss, count, sums = dapo_loss_terms(logprob, batch, loss_config)
    (loss / count).backward()
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"peak_mb": peak_mb - baseline_mb, "seconds": seconds, "loss": float(loss / count)}


def measure(variant: str, tokens: int, args: argparse.Namespace) -> dict[str, float]:
    """Run a variant in a fresh child process and parse its JSON line."""
    command = [sys.executable, __file__, "--variant", variant, "--tokens", str(tokens), "--vocab", str(args.vocab),
               "--hidden", str(args.hidden), "--chunk-size", str(args.chunk_size)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=152064)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--scaling-factor", type=int, default=4, help="fused_linear alone at tokens × this")
    parser.add_argument("--quick", action="store_true", help="512 tokens × vocab 32768 × hidden 256")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.vocab, args.hidden = 512, 32768, 256
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.tokens, args.vocab, args.hidden, args.chunk_size)))
        return

    print(f"tokens={args.tokens} vocab={args.vocab} hidden={args.hidden} chunk={args.chunk_size} "
          f"threads={torch.get_num_threads()} (fp32, forward+backward, one iteration)")
    results = {variant: measure(variant, args.tokens, args) for variant in VARIANTS}
    for variant, result in results.items():
        print(f"{variant:>13}: peak_mem={result['peak_mb']:9.1f} MB  time={result['seconds']:7.2f} s")
    naive = results["naive"]
    for variant in ("fused", "fused_linear"):
        print(f"{variant}/naive peak_mem_ratio={results[variant]['peak_mb'] / naive['peak_mb']:.3f} "
              f"time_ratio={results[variant]['seconds'] / naive['seconds']:.3f}")
    long_tokens = args.tokens * args.scaling_factor
    scaled = measure("fused_linear", long_tokens, args)
    print(f"fused_linear at {long_tokens} tokens: peak_mem={scaled['peak_mb']:.1f} MB  time={scaled['seconds']:.2f} s")
    print(f"fused_linear scaling {long_tokens}/{args.tokens} "
          f"peak_mem_ratio={scaled['peak_mb'] / results['fused_linear']['peak_mb']:.3f}")
    linear = results["fused_linear"]
    print(f"fused_linear/naive peak_mem_ratio={linear['peak_mb'] / naive['peak_mb']:.3f} "
          f"time_ratio={linear['seconds'] / naive['seconds']:.3f}")


if __name__ == "__main__":
    main()
