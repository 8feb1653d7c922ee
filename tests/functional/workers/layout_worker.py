"""torchrun worker: the actor's log-probs, DAPO gradients and one optimiser step under one parallel layout.

Run by tests/functional/test_parallel_layouts.py. Reads ``<work>/batch.pt`` and the HF folders
``<work>/untied`` and ``<work>/tied``; rank 0 writes ``<work>/<name>.pt`` with HF-named results.
"""

import argparse
from pathlib import Path

import torch
import torch.distributed as dist

from megatron.core import parallel_state

from megatron_dapo.batch import data_parallel_partition, sample_cost, sample_lengths
from megatron_dapo.distributed import destroy_distributed, initialize_distributed
from megatron_dapo.weights.sync import hf_state_dict
from megatron_dapo.weights.transfer import gradients_of
from tests.helpers import build_actor, test_config

MODES = ("token-mean", "seq-mean-token-mean")
TRANSPORTS = ("shared_memory", "collectives")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=None)
    parser.add_argument("--micro", type=int, required=True)
    parser.add_argument("--loss-impl", default="fused")
    parser.add_argument("--sp", action="store_true")
    parser.add_argument("--distopt", action="store_true")
    parser.add_argument("--consecutive", action="store_true", help="parallel.balance_data=false")
    parser.add_argument("--max-tokens", type=int, default=0, help="parallel.max_tokens_per_micro_batch")
    args = parser.parse_args()
    initialize_distributed(args.tp, args.pp, seed=1, virtual_pipeline_model_parallel_size=args.vpp)
    batch = torch.load(args.work / "batch.pt")
    overrides = {
        "parallel.tensor_model_parallel_size": args.tp, "parallel.pipeline_model_parallel_size": args.pp,
        "parallel.micro_batch_size": args.micro, "parallel.virtual_pipeline_model_parallel_size": args.vpp or "null", "parallel.sequence_parallel": args.sp,
        "parallel.use_distributed_optimizer": args.distopt, "model.loss_impl": args.loss_impl,
        "optimizer.lr": 1e-3, "optimizer.lr_warmup_steps": 0, "optimizer.weight_decay": 0.0,
        "optimizer.clip_grad": 1e9, "rollout.temperature": 1.0, "parallel.max_tokens_per_micro_batch": args.max_tokens,
    }
    # This data-parallel replica's share (one mini-batch: the whole batch), and the way back to the full batch.
    dp_size, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    num = batch["input_ids"].shape[0]
    costs = [sample_cost(length, 32) for length in sample_lengths(batch["loss_mask"])]
    partition = data_parallel_partition(costs, num, dp_size, balance=not args.consecutive)
    local = {key: value[partition[dp_rank]] for key, value in batch.items()}

    def full_batch_logprobs(local_logprobs):
        parts = [torch.empty_like(local_logprobs) for _ in range(dp_size)]
        dist.all_gather(parts, local_logprobs, group=parallel_state.get_data_parallel_group())
        merged = torch.empty(num, local_logprobs.shape[1])
        for replica, part in enumerate(parts):
            merged[partition[replica]] = part
        return merged

    results: dict[str, object] = {}
    for model_name in ("untied", "tied"):
        hf_dir = args.work / model_name
        for mode in MODES[:1] if args.distopt else MODES:  # the distributed optimizer keeps only a gradient shard
            actor = build_actor(test_config(**overrides, **{"algorithm.loss_agg_mode": mode}), hf_dir)
            if mode == MODES[0]:
                results[f"{model_name}/logprobs"] = full_batch_logprobs(actor.compute_logprobs(local, 1.0)[0])
            if args.distopt:
                actor.train_step(local)
                for transport in TRANSPORTS:
                    state = hf_state_dict(actor.model_chunks, actor.layout, transport=transport)
                    results[f"{model_name}/params_after_step/{transport}"] = state
                continue
            sums = actor.forward_backward(local)
            results[f"{model_name}/{mode}/loss"] = sums["loss_numerator"] / sums["loss_count"]
            for transport in TRANSPORTS:  # the CPU transport and the GPU path's collectives
                grads = hf_state_dict(actor.model_chunks, actor.layout, gradients_of, transport=transport)
                results[f"{model_name}/{mode}/grads/{transport}"] = grads
    if dist.get_rank() == 0:
        torch.save(results, args.work / f"{args.name}.pt")
    destroy_distributed()


if __name__ == "__main__":
    main()
