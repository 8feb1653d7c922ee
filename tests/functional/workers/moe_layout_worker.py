"""torchrun worker: a Qwen3-MoE (or Qwen3 dense) actor under one EP/ETP/TP/PP/DP layout: log-probs, the DAPO loss,
every gradient and, after one optimiser step, the weights, gathered through both resharder transports.

Run by tests/functional/test_moe_layouts.py. Reads ``<work>/batch.pt`` and the HF folder ``<work>/<model>``;
rank 0 (and the last rank, a second receiver) write ``<work>/<name>.rank<r>.pt``.
"""

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_dapo.batch import data_parallel_rows
from megatron_dapo.distributed import destroy_distributed, initialize_distributed
from megatron_dapo.weights.transfer import gradients_of, stream_hf_buckets, weights_of
from tests.helpers import build_actor, test_config

TRANSPORTS = ("shared_memory", "collectives")


def _gathered(actor, tensor_of, transport: str, receivers: tuple[int, ...]) -> dict[str, torch.Tensor] | None:
    stream = stream_hf_buckets(actor.model_chunks, actor.layout, 1024, tensor_of=tensor_of, receivers=receivers,
                               transport=transport)  # 1 KB buckets: many buckets, expert and dense ones apart
    state = {name: tensor.clone() for bucket in stream for name, tensor in bucket}
    return state if dist.get_rank() in receivers else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--model", default="moe")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--etp", type=int, default=None)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--sp", action="store_true")
    args = parser.parse_args()
    initialize_distributed(args.tp, args.pp, seed=1, expert_model_parallel_size=args.ep,
                           expert_tensor_parallel_size=args.etp)
    batch = torch.load(args.work / "batch.pt")
    overrides = {
        "parallel.tensor_model_parallel_size": args.tp, "parallel.pipeline_model_parallel_size": args.pp,
        "parallel.expert_model_parallel_size": args.ep, "parallel.expert_tensor_parallel_size": args.etp or "null",
        "parallel.micro_batch_size": args.micro, "parallel.sequence_parallel": args.sp,
        "optimizer.lr": 1e-3, "optimizer.lr_warmup_steps": 0, "optimizer.weight_decay": 0.0,
        "optimizer.clip_grad": 1e9, "rollout.temperature": 1.0,
    }
    dp_size, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    num = batch["input_ids"].shape[0]
    local = {key: value[data_parallel_rows(num, num, dp_size, dp_rank)] for key, value in batch.items()}

    def full_batch(local_rows: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(local_rows) for _ in range(dp_size)]
        dist.all_gather(parts, local_rows, group=parallel_state.get_data_parallel_group())
        merged = torch.empty(num, local_rows.shape[1])
        for replica, part in enumerate(parts):
            merged[data_parallel_rows(num, num, dp_size, replica)] = part
        return merged

    actor = build_actor(test_config(**overrides), args.work / args.model)
    receivers = (0, dist.get_world_size() - 1)
    results: dict[str, object] = {"logprobs": full_batch(actor.compute_logprobs(local, 1.0)[0])}
    sums = actor.forward_backward(local)
    results["loss"] = sums["loss_numerator"] / sums["loss_count"]
    for transport in TRANSPORTS:
        results[f"grads/{transport}"] = _gathered(actor, gradients_of, transport, receivers)
    actor.train_step(local)
    results["logprobs_after_step"] = full_batch(actor.compute_logprobs(local, 1.0)[0])
    for transport in TRANSPORTS:
        results[f"weights/{transport}"] = _gathered(actor, weights_of, transport, receivers)
    if dist.get_rank() in receivers:
        torch.save(results, args.work / f"{args.name}.rank{dist.get_rank()}.pt")
    destroy_distributed()


if __name__ == "__main__":
    main()
