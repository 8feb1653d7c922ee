"""Move weights between a TP/PP-sharded Megatron model and Hugging Face names and layouts.

``load_hf_checkpoint`` fills this rank's shards from an HF safetensors folder, reading only the slices its
TP rank and pipeline stage need. ``stream_hf_buckets`` is the in-job resharder: it gathers TP shards and
pipeline stages into full HF tensors in buckets of ``bucket_bytes``, so no rank ever holds more than one
bucket of the full model — through shared memory when all ranks are CPU processes of one host, otherwise
through collectives (one flat buffer per dtype per bucket and pipeline hop). The rollout-engine sync, the
HF export and the gradient-parity tests all go through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_dapo.errors import different_models
from megatron_dapo.model_config import ModelLayout
from megatron_dapo.weights.hf_mapping import (
    ParamMapping,
    TensorReader,
    hf_to_megatron,
    megatron_to_hf,
    param_mapping,
)
from megatron_dapo.weights.safetensors_io import SafetensorsReader, TensorSpec
from megatron_dapo.weights.shared_memory import Arena, SharedRegions, same_host

DEFAULT_BUCKET_BYTES = 512 * 1024**2
Bucket = list[tuple[str, torch.Tensor]]


ModelChunks = torch.nn.Module | list[torch.nn.Module]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare ``GPTModel`` inside DDP / Float16 wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def chunks_of(model: ModelChunks) -> list[torch.nn.Module]:
    """This rank's model chunks: one, or one per virtual pipeline stage (interleaved schedule)."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


def local_param_mappings(model: ModelChunks, layout: ModelLayout) -> Iterator[tuple[torch.nn.Parameter, ParamMapping]]:
    """Each parameter of this rank's chunks with its HF mapping (global layer indices via ``layer_number``)."""
    for chunk in chunks_of(model):
        gpt = unwrap(chunk)
        for name, param in gpt.named_parameters():
            layer_index = None
            if name.startswith("decoder.layers."):
                local_index = int(name.split(".")[2])
                layer_index = gpt.decoder.layers[local_index].layer_number - 1
            yield param, param_mapping(name, layer_index, layout)


def load_weights(model: ModelChunks, reader: TensorReader, layout: ModelLayout, source: str) -> None:
    """Copy HF weights from ``reader`` into this rank's Megatron shards, refusing shape mismatches."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    for param, mapping in local_param_mappings(model, layout):
        shard = hf_to_megatron(mapping, reader, layout, tp_rank, tp_size, padded_rows=param.shape[0] * tp_size)
        if shard.shape != param.shape:
            raise different_models(
                f"{source}: {mapping.hf_names} give {mapping.megatron_name} shape {tuple(shard.shape)}, the model "
                f"expects {tuple(param.shape)}", "weights"
            )
        with torch.no_grad():
            param.copy_(shard)


def load_hf_checkpoint(model: ModelChunks, hf_dir: str | Path, layout: ModelLayout) -> None:
    """Fill this rank's shards from an HF safetensors folder (only the slices this rank needs are read)."""
    load_weights(model, SafetensorsReader(hf_dir), layout, str(hf_dir))


# ---------------------------------------------------------------------------------- streaming resharder
def weights_of(param: torch.nn.Parameter) -> torch.Tensor:
    """What the resharder gathers by default: the parameter's values."""
    return param.detach()


def gradients_of(param: torch.nn.Parameter) -> torch.Tensor:
    """The parameter's accumulated gradient (megatron DDP's ``main_grad``)."""
    return param.main_grad


@dataclass(frozen=True)
class _Entry:
    """One Megatron parameter of a stage, its local (TP) shard, and the HF tensors it becomes."""

    stage: int
    index: int  # position among the stage's exported parameters
    specs: tuple[TensorSpec, ...]
    shard: TensorSpec  # this stage's TP-local tensor (every TP rank's has this shape)
    tp_sharded: bool
    mapping: ParamMapping


def _exported(model: ModelChunks, layout: ModelLayout) -> list[tuple[torch.nn.Parameter, ParamMapping]]:
    """The stage's parameters that appear in the HF checkpoint (a tied output layer is the embedding)."""
    return [
        (param, mapping)
        for param, mapping in local_param_mappings(model, layout)
        if not (mapping.megatron_name == "output_layer.weight" and layout.tie_word_embeddings)
    ]


def _hf_specs(param: torch.Tensor, mapping: ParamMapping, layout: ModelLayout, dtype: torch.dtype) -> tuple[TensorSpec, ...]:
    tp_size = parallel_state.get_tensor_model_parallel_world_size() if getattr(param, "tensor_model_parallel", False) else 1
    meta = [torch.empty(param.shape, device="meta")] * tp_size
    return tuple(TensorSpec(n, tuple(t.shape), dtype) for n, t in zip(mapping.hf_names, megatron_to_hf(mapping, meta, layout)))


def hf_plan(
    model: ModelChunks,
    layout: ModelLayout,
    dtype: torch.dtype,
    tensor_of: Callable[[torch.nn.Parameter], torch.Tensor] = weights_of,
) -> list[_Entry]:
    """Every exported parameter of every stage, in stage order (collective over the pipeline group)."""
    local = []
    for param, mapping in _exported(model, layout):
        shard = tensor_of(param)
        local.append((_hf_specs(param, mapping, layout, dtype), TensorSpec(mapping.megatron_name, tuple(shard.shape), shard.dtype),
                      bool(getattr(param, "tensor_model_parallel", False)), mapping))
    stages = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(stages, local, group=parallel_state.get_pipeline_model_parallel_group())
    return [
        _Entry(stage, index, *entry) for stage, stage_entries in enumerate(stages) for index, entry in enumerate(stage_entries)
    ]


def _buckets(plan: list[_Entry], bucket_bytes: int) -> list[list[_Entry]]:
    """Consecutive entries of one stage, up to ``bucket_bytes`` each (a larger entry gets its own)."""
    buckets: list[list[_Entry]] = []
    size = 0
    for entry in plan:
        entry_bytes = sum(s.nbytes for s in entry.specs)
        if not buckets or buckets[-1][0].stage != entry.stage or (size + entry_bytes > bucket_bytes):
            buckets.append([])
            size = 0
        buckets[-1].append(entry)
        size += entry_bytes
    return buckets


def _gather_tp(tensor: torch.Tensor, is_tp_sharded: bool) -> list[torch.Tensor]:
    """All TP shards of a tensor, in TP-rank order (replicated tensors are returned once)."""
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    if tp_size == 1 or not is_tp_sharded:
        return [tensor]
    shards = [torch.empty_like(tensor) for _ in range(tp_size)]
    dist.all_gather(shards, tensor.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return shards


def _flat_buffers(specs: list[TensorSpec], device: torch.device) -> dict[torch.dtype, torch.Tensor]:
    sizes: dict[torch.dtype, int] = {}
    for spec in specs:
        sizes[spec.dtype] = sizes.get(spec.dtype, 0) + spec.numel
    return {dtype: torch.empty(size, dtype=dtype, device=device) for dtype, size in sizes.items()}


def _unflatten(specs: list[TensorSpec], buffers: dict[torch.dtype, torch.Tensor]) -> Bucket:
    offsets = dict.fromkeys(buffers, 0)
    bucket = []
    for spec in specs:
        start = offsets[spec.dtype]
        bucket.append((spec.name, buffers[spec.dtype][start : start + spec.numel].view(spec.shape)))
        offsets[spec.dtype] = start + spec.numel
    return bucket


def stream_hf_buckets(
    model: ModelChunks,
    layout: ModelLayout,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    to_all_ranks: bool = False,
    dtype: torch.dtype = torch.float32,
    tensor_of: Callable[[torch.nn.Parameter], torch.Tensor] = weights_of,
) -> Iterator[Bucket]:
    """Full HF-named tensors, a bucket of about ``bucket_bytes`` at a time. Collective: every rank iterates.

    Buckets arrive on global rank 0 only, or on every rank with ``to_all_ranks`` (colocated engines that
    each need every tensor); other ranks' iterators yield nothing. ``tensor_of`` picks what is gathered
    (``lambda p: p.main_grad`` gathers gradients). A bucket's tensors are only valid until the iterator
    advances (they may live in reused buffers): consume or copy them first.

    Transport: when every rank is a CPU process on one host and buckets go to rank 0, the shards travel
    through shared memory (written once by their owners, merged once by rank 0); otherwise TP shards are
    all-gathered and each bucket crosses the pipeline as one flat buffer per dtype.
    """
    plan = hf_plan(model, layout, dtype, tensor_of)
    buckets = _buckets(plan, bucket_bytes)
    device = next(unwrap(chunks_of(model)[0]).parameters()).device
    if not to_all_ranks and device.type == "cpu" and dist.get_world_size() > 1 and same_host():
        return _stream_through_shared_memory(model, layout, buckets, dtype, tensor_of)
    return _stream_through_collectives(model, layout, buckets, to_all_ranks, device, tensor_of)


def _stream_through_collectives(model, layout, buckets, to_all_ranks, device, tensor_of) -> Iterator[Bucket]:
    exported = _exported(model, layout)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    pp_ranks = dist.get_process_group_ranks(pp_group)
    on_rank_zero_line = parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0
    takes_part = to_all_ranks or parallel_state.get_data_parallel_rank() == 0
    for bucket in buckets:
        if not takes_part:
            continue
        stage = bucket[0].stage
        specs = [spec for entry in bucket for spec in entry.specs]
        buffers = _flat_buffers(specs, device)
        if stage == pp_rank:
            named = []
            for entry in bucket:
                param, mapping = exported[entry.index]
                shards = _gather_tp(tensor_of(param), entry.tp_sharded)
                named += megatron_to_hf(mapping, shards, layout)
            for (_, view), tensor in zip(_unflatten(specs, buffers), named):
                view.copy_(tensor)
        if len(pp_ranks) > 1:
            if to_all_ranks:
                for flat in buffers.values():
                    dist.broadcast(flat, src=pp_ranks[stage], group=pp_group)
            elif on_rank_zero_line and stage != 0:
                for flat in buffers.values():
                    if pp_rank == stage:
                        dist.send(flat, dst=pp_ranks[0])
                    elif pp_rank == 0:
                        dist.recv(flat, src=pp_ranks[stage])
        if to_all_ranks or dist.get_rank() == 0:
            yield _unflatten(specs, buffers)


_REGIONS = SharedRegions()
_ARENA = Arena()


def _stream_through_shared_memory(model, layout, buckets, dtype, tensor_of) -> Iterator[Bucket]:
    """Owners (data-parallel rank 0 of each stage, every TP rank) write their shards of a bucket into their
    shared region; rank 0 merges them into a reused arena and yields views. Two barriers per bucket keep
    a region from being overwritten while it is read (docs/pitfalls.md, 15: the same rule on CPU)."""
    exported = _exported(model, layout)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    owner = parallel_state.get_data_parallel_rank() == 0
    coords = [None] * dist.get_world_size()
    my_coords = (pp_rank, parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_data_parallel_rank())
    dist.all_gather_object(coords, my_coords)
    owner_rank = {(pp, tp): rank for rank, (pp, tp, dp) in enumerate(coords) if dp == 0}
    need = max((sum(e.shard.nbytes for e in bucket) for bucket in buckets if bucket[0].stage == pp_rank), default=0)
    _REGIONS.publish(need if owner else 0, readers={0})
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    for bucket in buckets:
        stage = bucket[0].stage
        if owner and stage == pp_rank:
            offset = 0
            for entry in bucket:
                _REGIONS.view(dist.get_rank(), offset, entry.shard.shape, entry.shard.dtype).copy_(tensor_of(exported[entry.index][0]))
                offset += entry.shard.nbytes
        dist.barrier()
        if dist.get_rank() == 0:
            _ARENA.reserve(sum(spec.nbytes + Arena.ALIGN for entry in bucket for spec in entry.specs))
            named: Bucket = []
            offset = 0
            for entry in bucket:
                ranks = [owner_rank[(stage, tp)] for tp in range(tp_size if entry.tp_sharded else 1)]
                shards = [_REGIONS.view(rank, offset, entry.shard.shape, entry.shard.dtype) for rank in ranks]
                offset += entry.shard.nbytes
                tensors = megatron_to_hf(entry.mapping, shards, layout, _ARENA.allocate)
                named += [(spec.name, tensor.to(spec.dtype)) for spec, tensor in zip(entry.specs, tensors)]
            yield named  # views into the regions and the arena: the owners wait below until it is consumed
        dist.barrier()


def hf_specs(model: ModelChunks, layout: ModelLayout, dtype: torch.dtype = torch.float32) -> list[TensorSpec]:
    """Names, shapes and dtypes of the full HF tensors, in ``stream_hf_buckets`` order (collective)."""
    return [spec for entry in hf_plan(model, layout, dtype) for spec in entry.specs]

