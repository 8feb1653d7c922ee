"""torchrun worker: the bytes this rank really holds for parameters, gradients and optimizer state, and what the
forward saves for backward, for the memory planner's validation (tests/functional/test_planner_validation.py).

For each of bf16 on/off × distributed optimizer on/off × the models (``--models``: untied/tied Qwen2, or a
Qwen3-MoE under ``--ep``/``--etp``), builds the actor from ``<work>/<model>``, takes one optimiser step (torch's
AdamW creates its moments lazily) and counts unique storages. Every rank writes ``<work>/<name>/rank<r>.json``
with its pipeline, data-parallel and expert data-parallel coordinates.
"""

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_dapo.batch import data_parallel_rows
from megatron_dapo.distributed import destroy_distributed, initialize_distributed
from megatron_dapo.weights.transfer import unwrap
from tests.helpers import build_actor, test_config


def storage_bytes(tensors, exclude: set[int] = frozenset()) -> tuple[int, set[int]]:
    """Bytes of the unique storages behind ``tensors`` (storages in ``exclude`` not counted), and their ids."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values()), set(seen)


def state_bytes(actor) -> dict[str, int]:
    """Parameters (their storages: the distributed optimizer's padded buffer), ``main_grad`` buffers, and the
    optimizer's fp32 main parameters where they are copies plus Adam's ``exp_avg``/``exp_avg_sq``."""
    params = [p for chunk in actor.model_chunks for p in chunk.parameters()]
    param_bytes, param_storages = storage_bytes(params)
    grad_bytes, grad_storages = storage_bytes([p.main_grad for p in params])
    main_params, moments = [], []
    for optimizer in actor.optimizer.chained_optimizers:
        inner = optimizer.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                main_params.append(param)
                moments += [inner.state[param][key] for key in ("exp_avg", "exp_avg_sq")]
    main_bytes, _ = storage_bytes(main_params, exclude=param_storages | grad_storages)
    moment_bytes, _ = storage_bytes(moments)
    return {"params": param_bytes, "grads": grad_bytes, "optimizer": main_bytes + moment_bytes}


def saved_activation_bytes(actor, seq: int, micro_batch: int) -> int:
    """Bytes of the unique storages the model chunk's forward saves for backward (parameters excluded), one
    micro-batch of ``seq`` tokens; stages after the first get a received input tensor as the schedule gives."""
    chunk = actor.model_chunks[0]
    gpt = unwrap(chunk)
    params = {p.untyped_storage().data_ptr() for p in chunk.parameters()}
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(2, 50, (micro_batch, seq), generator=generator)
    if not gpt.pre_process:
        tp = parallel_state.get_tensor_model_parallel_world_size() if gpt.config.sequence_parallel else 1
        hidden = torch.randn(seq // tp, micro_batch, gpt.config.hidden_size, generator=generator)
        gpt.set_input_tensor(hidden.to(actor.params_dtype).requires_grad_(True))
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    chunk.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        actor._forward(chunk, {"input_ids": input_ids})
    gpt.set_input_tensor(None)
    return sum(saved.values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--sp", action="store_true")
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--etp", type=int, default=None)
    parser.add_argument("--models", default="untied,tied")
    parser.add_argument("--seq", type=int, default=32)
    args = parser.parse_args()
    initialize_distributed(args.tp, args.pp, seed=1, expert_model_parallel_size=args.ep,
                           expert_tensor_parallel_size=args.etp)
    batch = torch.load(args.work / "batch.pt")
    dp_size, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    num = batch["input_ids"].shape[0]
    local = {key: value[data_parallel_rows(num, num, dp_size, dp_rank)] for key, value in batch.items()}
    results: dict[str, object] = {
        "pp_rank": parallel_state.get_pipeline_model_parallel_rank(), "dp_rank": dp_rank, "dp": dp_size,
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "expert_dp_rank": parallel_state.get_expert_data_parallel_rank(),
    }
    for model_name in args.models.split(","):
        for bf16 in (False, True):
            for distopt in (False, True):
                overrides = {
                    "parallel.tensor_model_parallel_size": args.tp, "parallel.pipeline_model_parallel_size": args.pp,
                    "parallel.sequence_parallel": args.sp, "parallel.use_distributed_optimizer": distopt,
                    "parallel.expert_model_parallel_size": args.ep,
                    "parallel.expert_tensor_parallel_size": args.etp or "null",
                    "parallel.micro_batch_size": 2, "model.bf16": bf16, "optimizer.lr_warmup_steps": 0,
                }
                actor = build_actor(test_config(**overrides), args.work / model_name)
                key = f"{model_name}/bf16={bf16}/distopt={distopt}"
                if not distopt:  # activations do not depend on the optimizer
                    results[f"{key}/activations"] = saved_activation_bytes(actor, args.seq, 2)
                actor.train_step(local)
                results[key] = state_bytes(actor)
                del actor
    out = args.work / args.name
    out.mkdir(exist_ok=True)
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(results))
    destroy_distributed()


if __name__ == "__main__":
    main()
