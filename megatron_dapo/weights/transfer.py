"""Move weights between a (TP/PP-sharded) Megatron model and Hugging Face names and layouts.

``load_hf_checkpoint`` fills this rank's shards from an HF safetensors folder, reading only the tensors its
pipeline stage needs. ``gather_hf_state`` merges all shards into full HF tensors on global rank 0 (the
in-job weight sync and the HF export use it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from safetensors import safe_open

from megatron_dapo.weights.hf_mapping import ModelLayout, ParamMapping, megatron_to_hf, hf_to_megatron, param_mapping


class CheckpointMismatchError(ValueError):
    """An HF checkpoint does not fit the model being built (missing tensors, other shapes)."""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare ``GPTModel`` inside DDP / Float16 wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def local_param_mappings(model: torch.nn.Module, layout: ModelLayout) -> Iterator[tuple[torch.nn.Parameter, ParamMapping]]:
    """Each parameter of this rank's stage with its HF mapping (global layer indices via ``layer_number``)."""
    gpt = unwrap(model)
    for name, param in gpt.named_parameters():
        layer_index = None
        if name.startswith("decoder.layers."):
            local_index = int(name.split(".")[2])
            layer_index = gpt.decoder.layers[local_index].layer_number - 1
        yield param, param_mapping(name, layer_index, layout)


def _hf_tensor_files(hf_dir: Path) -> dict[str, Path]:
    """HF tensor name -> safetensors file holding it (sharded with an index, or a single file)."""
    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: hf_dir / file for name, file in weight_map.items()}
    single = hf_dir / "model.safetensors"
    if not single.exists():
        raise CheckpointMismatchError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


def load_hf_checkpoint(model: torch.nn.Module, hf_dir: str | Path, layout: ModelLayout) -> None:
    """Copy HF safetensors weights into this rank's Megatron shards, refusing shape mismatches."""
    hf_dir = Path(hf_dir)
    files = _hf_tensor_files(hf_dir)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    handles: dict[Path, object] = {}
    for param, mapping in local_param_mappings(model, layout):
        tensors = []
        for hf_name in mapping.hf_names:
            if hf_name not in files:
                raise CheckpointMismatchError(f"{hf_dir}: checkpoint has no tensor {hf_name!r} (needed for {mapping.megatron_name})")
            path = files[hf_name]
            handle = handles.setdefault(path, safe_open(str(path), framework="pt"))
            tensors.append(handle.get_tensor(hf_name).to(torch.float32))
        shard = hf_to_megatron(mapping, tensors, layout, tp_rank, tp_size, padded_rows=param.shape[0] * tp_size)
        if shard.shape != param.shape:
            raise CheckpointMismatchError(
                f"{hf_dir}: {mapping.hf_names} give {mapping.megatron_name} shape {tuple(shard.shape)}, the model "
                f"expects {tuple(param.shape)}: checkpoint and model config belong to different models"
            )
        with torch.no_grad():
            param.copy_(shard)


def _gather_tp(param: torch.Tensor) -> list[torch.Tensor]:
    """All TP shards of a parameter, in TP-rank order (replicated tensors are returned once)."""
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return [param.detach()]
    shards = [torch.empty_like(param) for _ in range(tp_size)]
    dist.all_gather(shards, param.detach().contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return shards


def gather_hf_state(model: torch.nn.Module, layout: ModelLayout) -> dict[str, torch.Tensor] | None:
    """Full HF state dict of the model on global rank 0 (``None`` elsewhere). Collective over all ranks.

    Simple version: TP all-gather per tensor, then each pipeline stage's dict is gathered whole to rank 0.
    With tied embeddings the last stage's output-layer copy is skipped.
    """
    stage_state: dict[str, torch.Tensor] = {}
    for param, mapping in local_param_mappings(model, layout):
        shards = _gather_tp(param)
        if mapping.megatron_name == "output_layer.weight" and layout.tie_word_embeddings:
            continue
        for hf_name, tensor in zip(mapping.hf_names, megatron_to_hf(mapping, shards, layout)):
            stage_state[hf_name] = tensor.clone()
    is_stage_writer = (
        parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0
    )
    if dist.get_world_size() == 1:
        return stage_state
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(stage_state if is_stage_writer else None, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    return {name: tensor for part in gathered if part for name, tensor in part.items()}
