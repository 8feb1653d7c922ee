"""In-job weight sync: throughput of the bucketed resharder vs a plain memory copy of the same bytes.

A Qwen2-shaped model of a few hundred MB (fp32, random weights) is built under TP=2 × PP=2 (4 processes on
one host, CPU). Global rank 0 receives every full Hugging Face tensor from ``stream_hf_buckets`` — the
resharder — for several bucket sizes, once on its own and once also copying each tensor into a
preallocated HF-layout destination (what the CPU rollout engine does with a bucket), through both
transports: shared memory (the CPU default) and collectives (the GPU path: TP all-gather, pipeline
send/recv; here over gloo). The baseline is one ``copy_`` of the same number of bytes inside rank 0: the
physical limit of moving them once in memory. The last line is the default transport's throughput at
512 MB buckets over memcpy's; the line before it the collectives transport's.

    python benchmarks/bench_weight_sync.py            # ~590 MB model
    python benchmarks/bench_weight_sync.py --quick    # ~26 MB model, seconds
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


def model_config(quick: bool):
    from transformers import Qwen2Config

    if quick:
        return Qwen2Config(vocab_size=8000, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
    return Qwen2Config(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                       num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)


def worker(quick: bool, repeats: int, out: Path) -> None:
    """One rank of the 4-process job (run by torchrun)."""
    import torch.distributed as dist

    from megatron_dapo.actor.model import build_gpt_model, transformer_config_from_hf
    from megatron_dapo.distributed import initialize_distributed
    from megatron_dapo.model_config import ModelLayout
    from megatron_dapo.weights.transfer import hf_specs, stream_hf_buckets

    initialize_distributed(2, 2, seed=0)
    hf_config = model_config(quick)
    model = build_gpt_model(hf_config, transformer_config_from_hf(hf_config, 2, 2), 128)
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
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_out:
        worker(args.quick, args.repeats, args.worker_out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4", __file__,
                   "--repeats", str(args.repeats), "--worker-out", str(out)] + (["--quick"] if args.quick else [])
        env = dict(os.environ, OMP_NUM_THREADS="1")
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        results = json.loads(out.read_text())
    total = results["total_bytes"]
    print(f"model: {total / MB:.0f} MB of fp32 HF tensors; TP=2 x PP=2, 4 processes on one host, CPU; best of {args.repeats}")
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
