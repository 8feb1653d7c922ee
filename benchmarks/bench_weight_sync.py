"""In-job weight sync: throughput of the bucketed resharder vs a plain memory copy of the same bytes.

A Qwen2-shaped model of a few hundred MB (fp32, random weights) is built under TP=2 × PP=2 (4 processes on
one host, CPU). Global rank 0 receives every full Hugging Face tensor from ``stream_hf_buckets`` — the
resharder — for several bucket sizes, once on its own and once also copying each tensor into a
preallocated HF-layout destination (what the CPU rollout engine does with a bucket), through both
transports: shared memory (the CPU default) and collectives (the GPU path: TP all-gather, pipeline
send/recv; here over gloo). The baseline is one ``copy_`` of the same number of bytes inside rank 0: the
physical limit of moving them once in memory. The last line is the default transport's throughput at
512 MB buckets over memcpy's; the line before it the collectives transport's.

``--moe``: a Qwen3-MoE of about the same size (8 experts per layer) under TP=2 (+SP) × PP=2 with EP=2: each
rank holds half of each layer's experts, which the resharder gathers over the expert-parallel group.

    python benchmarks/bench_weight_sync.py            # ~590 MB model
    python benchmarks/bench_weight_sync.py --quick    # ~26 MB model, seconds
    python benchmarks/bench_weight_sync.py --moe      # ~620 MB MoE model, EP=2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

MB = 1024**2
BUCKETS_MB = {"512 MB buckets (default)": 512, "32 MB buckets": 32, "per tensor": 0}
DEFAULT = "512 MB buckets (default)"
TRANSPORTS = {"shared_memory": BUCKETS_MB, "collectives": {DEFAULT: 512}}


def model_config(quick: bool, moe: bool = False):
    from transformers import Qwen2Config, Qwen3MoeConfig

    if moe:
        hidden, layers, experts_ffn, vocab = (256, 4, 176, 8000) if quick else (1024, 8, 448, 32000)
        return Qwen3MoeConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                              moe_intermediate_size=experts_ffn, num_experts=8, num_experts_per_tok=2,
                              num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
                              head_dim=hidden // 8, tie_word_embeddings=False)
    if quick:
        return Qwen2Config(vocab_size=8000, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
    return Qwen2Config(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                       num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)


def worker(quick: bool, repeats: int, out: Path, moe: bool = False) -> None:
    """One rank of the 4-process job (run by torchrun)."""
    import torch.distributed as dist

    from megatron_dapo.actor.model import build_gpt_model, transformer_config_from_hf
    from megatron_dapo.distributed import initialize_distributed
    from megatron_dapo.model_config import ModelLayout
    from megatron_dapo.weights.transfer import hf_specs, stream_hf_buckets

    ep = 2 if moe else 1
    initialize_distributed(2, 2, seed=0, expert_model_parallel_size=ep, expert_tensor_parallel_size=1 if moe else None)
    hf_config = model_config(quick, moe)
    config = transformer_config_from_hf(hf_config, 2, 2, sequence_parallel=moe, ep_size=ep, etp_size=1 if moe else None)
    model = build_gpt_model(hf_config, config, 128)
    layout = ModelLayout.from_hf_config(hf_config)
    specs = hf_specs(model, layout)
    total_bytes = sum(s.nbytes for s in specs)
    destination = {s.name: torch.empty(s.shape, dtype=s.dtype) for s in specs} if dist.get_rank() == 0 else {}
    results = {"total_bytes": total_bytes}
    if dist.get_rank() == 0:  # the baseline, while the other ranks wait idle in the barrier below
        source, target = torch.ones(total_bytes // 4), torch.empty(total_bytes // 4)
        times = []
        for _ in range(2 * repeats + 1):  # the first copy also faults the target's pages in
            start = time.perf_counter()
            target.copy_(source)
            times.append(time.perf_counter() - start)
        results["memcpy"] = min(times)
        del source, target
    for transport, buckets_mb in TRANSPORTS.items():
        for label, bucket_mb in buckets_mb.items():
            for into_engine in (False, True):
                times = []
                for _ in range(repeats):
                    dist.barrier()
                    start = time.perf_counter()
                    for bucket in stream_hf_buckets(model, layout, bucket_mb * MB, transport=transport):
                        for name, tensor in bucket if into_engine else ():
                            destination[name].copy_(tensor)
                    dist.barrier()
                    times.append(time.perf_counter() - start)
                results[f"{transport} {label}{' + engine copy' if into_engine else ''}"] = min(times)
    if dist.get_rank() == 0:
        out.write_text(json.dumps(results))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--moe", action="store_true", help="a Qwen3-MoE under EP=2 (TP=2 with SP, PP=2)")
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_out:
        worker(args.quick, args.repeats, args.worker_out, args.moe)
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4", __file__,
                   "--repeats", str(args.repeats), "--worker-out", str(out)] + (["--quick"] if args.quick else []) \
            + (["--moe"] if args.moe else [])
        env = dict(os.environ, OMP_NUM_THREADS="1")
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        results = json.loads(out.read_text())
    total = results["total_bytes"]
    layout = "Qwen3-MoE, TP=2 (SP) x PP=2 x EP=2" if args.moe else "TP=2 x PP=2"
    print(f"model: {total / MB:.0f} MB of fp32 HF tensors; {layout}, 4 processes on one host, CPU; best of {args.repeats}")
    for label in results:
        if label != "total_bytes":
            print(f"{label}: {results[label]:.3f} s, {total / 1e9 / results[label]:.2f} GB/s")
    default = f"shared_memory {DEFAULT}"
    print(f"per_tensor/bucketed time_ratio={results['shared_memory per tensor'] / results[default]:.2f}")
    print(f"resharder+engine_copy/memcpy throughput_ratio={results['memcpy'] / results[default + ' + engine copy']:.3f}")
    print(f"collectives resharder/memcpy throughput_ratio={results['memcpy'] / results[f'collectives {DEFAULT}']:.3f}")
    print(f"resharder/memcpy throughput_ratio={results['memcpy'] / results[default]:.3f}")

if __name__ == "__main__":
    main()
