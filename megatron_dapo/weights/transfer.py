"""Move weights between a TP/PP-sharded Megatron model and Hugging Face names and layouts.

``load_hf_checkpoint`` fills this rank's shards from an HF safetensors folder, reading only the slices its
TP rank and pipeline stage need. ``stream_hf_buckets`` is the in-job resharder: it gathers TP shards and
pipeline stages into full HF tensors in buckets of ``bucket_bytes``, so no rank ever holds more than one
bucket of the full model, and delivers them to the ranks that receive weights — through shared memory when
all ranks are CPU processes of one host, otherwise through collectives (TP gather, then point-to-point along
the pipeline; docs/design.md, "Weight sync"). The rollout-engine sync, the HF export and the gradient-parity
tests all go through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Iterator, Literal

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_dapo.errors import ConfigError, NonFiniteWeightsError, different_models
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
    """Each parameter of this rank's chunks with its HF mapping (global layer indices via ``layer_number``,
    global experts from this rank's expert-parallel rank)."""
    expert_offset = 0
    if layout.num_experts:
        ep_size = parallel_state.get_expert_model_parallel_world_size()
        expert_offset = parallel_state.get_expert_model_parallel_rank() * (layout.num_experts // ep_size)
    for chunk in chunks_of(model):
        gpt = unwrap(chunk)
        for name, param in gpt.named_parameters():
            layer_index = None
            if name.startswith("decoder.layers."):
                local_index = int(name.split(".")[2])
                layer_index = gpt.decoder.layers[local_index].layer_number - 1
            yield param, param_mapping(name, layer_index, layout, expert_offset)


def tensor_parallel_coordinates(mapping: ParamMapping) -> tuple[int, int]:
    """``(rank, size)`` in the group that splits this parameter: expert TP for experts, TP otherwise."""
    if mapping.expert is not None:
        return parallel_state.get_expert_tensor_parallel_rank(), parallel_state.get_expert_tensor_parallel_world_size()
    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


def load_weights(model: ModelChunks, reader: TensorReader, layout: ModelLayout, source: str) -> None:
    """Copy HF weights from ``reader`` into this rank's Megatron shards, refusing shape mismatches."""
    for param, mapping in local_param_mappings(model, layout):
        tp_rank, tp_size = tensor_parallel_coordinates(mapping)
        shard = hf_to_megatron(mapping, reader, layout, tp_rank, tp_size, padded_rows=param.shape[0] * tp_size)
        if shard.shape != param.shape:
            raise different_models(
                f"{source}: {mapping.hf_names} give {mapping.megatron_name} shape {tuple(shard.shape)}, the model "
                f"expects {tuple(param.shape)}", "weights"
            )
        with torch.no_grad():
            param.copy_(shard)


def check_finite_weights(model: ModelChunks, layout: ModelLayout, source: str) -> None:
    """Refuse weights holding NaN or Inf, naming the first such tensor, on every rank (collective: a shard of one
    rank can be the only bad one, and the others must not go on into collectives without it)."""
    bad = next(
        (mapping for param, mapping in local_param_mappings(model, layout) if not torch.isfinite(param).all()), None
    )
    found = [bad]
    if dist.is_initialized() and dist.get_world_size() > 1:
        found = [None] * dist.get_world_size()
        dist.all_gather_object(found, bad)
    bad = next((mapping for mapping in found if mapping is not None), None)
    if bad is not None:
        raise NonFiniteWeightsError(
            f"{source}: tensor {bad.megatron_name} (HF {', '.join(bad.hf_names)}) holds NaN or Inf values; these "
            "weights are corrupt: load another checkpoint or HF folder"
        )


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


def _flat_buffers(specs: list[TensorSpec], arena: Arena) -> dict[torch.dtype, torch.Tensor]:
    """One flat buffer per dtype holding ``specs`` back to back, from ``arena`` (already reserved)."""
    sizes: dict[torch.dtype, int] = {}
    for spec in specs:
        sizes[spec.dtype] = sizes.get(spec.dtype, 0) + spec.numel
    return {dtype: arena.allocate((size,), dtype) for dtype, size in sizes.items()}


def _unflatten(specs: list[TensorSpec], buffers: dict[torch.dtype, torch.Tensor]) -> Bucket:
    offsets = dict.fromkeys(buffers, 0)
    bucket = []
    for spec in specs:
        start = offsets[spec.dtype]
        bucket.append((spec.name, buffers[spec.dtype][start : start + spec.numel].view(spec.shape)))
        offsets[spec.dtype] = start + spec.numel
    return bucket


Transport = Literal["auto", "shared_memory", "collectives"]


def stream_hf_buckets(
    model: ModelChunks,
    layout: ModelLayout,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    dtype: torch.dtype = torch.float32,
    tensor_of: Callable[[torch.nn.Parameter], torch.Tensor] = weights_of,
    receivers: Collection[int] = (0,),
    transport: Transport = "auto",
) -> Iterator[Bucket]:
    """Full HF-named tensors, a bucket of about ``bucket_bytes`` at a time. Collective: every rank iterates.

    Buckets arrive on the global ranks in ``receivers``; the other ranks' iterators yield nothing. Each
    receiver gets its buckets from ranks of its own pipeline line (same TP and DP coordinates) or, through
    shared memory, from the shard owners of its host: no byte has to pass through a third rank. ``tensor_of``
    picks what is gathered (``gradients_of`` gathers gradients). A bucket's tensors are valid until the
    iterator advances (they may live in reused buffers): consume or copy them first.

    ``transport``: ``shared_memory`` (every rank a CPU process on one host: owners write their shards once,
    each receiver merges them once); ``collectives`` (the GPU path: the TP shards gathered to the ranks whose
    lines receive, then point-to-point sends along the pipeline); ``auto`` picks shared memory where it can.
    """
    plan = hf_plan(model, layout, dtype, tensor_of)
    buckets = _buckets(plan, bucket_bytes)
    device = next(unwrap(chunks_of(model)[0]).parameters()).device
    receivers = sorted(set(receivers))
    local_cpu_job = device.type == "cpu" and dist.get_world_size() > 1 and same_host()
    if transport == "shared_memory" and not local_cpu_job:
        raise ConfigError(
            "rollout.weight_sync_transport=shared_memory needs a job of several CPU processes on one host; "
            "use collectives (or auto)"
        )
    if transport == "shared_memory" or (transport == "auto" and local_cpu_job):
        return _stream_through_shared_memory(model, layout, buckets, tensor_of, receivers)
    return _stream_through_collectives(model, layout, buckets, device, tensor_of, receivers)


def _coordinates() -> list[tuple[int, int, int]]:
    """``(pp, tp, dp)`` of every global rank (collective)."""
    coords = [None] * dist.get_world_size()
    mine = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
    )
    dist.all_gather_object(coords, mine)
    return coords


class _Buffers:
    """The collectives transport's reused buffers: a bucket's full tensors (``out``), the TP exchange
    (``exchange``) and the mapping's merge scratch (``merge``). Each is valid until the next bucket."""

    def __init__(self, device: torch.device) -> None:
        self.out, self.exchange, self.merge = Arena(device), Arena(device), Arena(device)


_HOST_BUFFERS = _Buffers(torch.device("cpu"))  # CPU jobs keep them across syncs: pages fault in once


def _buffers_on(device: torch.device) -> _Buffers:
    """Host buffers are kept; GPU buffers live for one sync, so that the memory is free for the engine."""
    return _HOST_BUFFERS if device.type == "cpu" else _Buffers(device)


def _exchange_shards(
    local: list[torch.Tensor], sharded: list[int], destinations: set[int], arena: Arena
) -> dict[int, list[torch.Tensor]]:
    """For each ``local[i]`` (``i`` in ``sharded``): every TP rank's shard, in TP-rank order, on the TP ranks in
    ``destinations`` (the other ranks only send and get ``[]``).

    To every TP rank over NCCL: one ``all_gather_into_tensor`` per dtype of packed shards. Otherwise one
    send/receive pair per shard and peer, straight from the parameters (no packing copy); on gloo these also
    move the bytes 3–4× faster than its all-gather between processes of one host (measured: 150 MB per rank,
    2 ranks, 0.18 s against 0.53–0.65 s).
    """
    group = parallel_state.get_tensor_model_parallel_group()
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if len(destinations) == size and dist.get_backend(group) == "nccl":
        shards = {}
        for dtype in sorted({local[i].dtype for i in sharded}, key=str):
            members = [i for i in sharded if local[i].dtype == dtype]
            sizes = [local[i].numel() for i in members]
            send = torch.cat([local[i].reshape(-1) for i in members], out=arena.allocate((sum(sizes),), dtype))
            gathered = arena.allocate((size * send.numel(),), dtype)
            dist.all_gather_into_tensor(gathered, send, group=group)
            parts = gathered.chunk(size)
            for position, i in enumerate(members):
                start = sum(sizes[:position])
                shards[i] = [part[start : start + sizes[position]].view(local[i].shape) for part in parts]
        return shards
    receives = rank in destinations
    shards = {i: [local[i] if peer == rank else arena.allocate(tuple(local[i].shape), local[i].dtype) for peer in range(size)]
              if receives else [] for i in sharded}
    requests = []
    for i in sharded:
        tensor = local[i].contiguous()
        requests += [dist.isend(tensor, group_dst=peer, group=group) for peer in sorted(destinations - {rank})]
        if receives:
            requests += [dist.irecv(shards[i][peer], group_src=peer, group=group) for peer in range(size) if peer != rank]
    for request in requests:
        request.wait()
    return shards


def _assemble_stage_bucket(
    bucket: list[_Entry], exported, layout: ModelLayout, tensor_of, out: Bucket | None, destinations: set[int], buffers: _Buffers
) -> None:
    """A bucket of this stage as full HF tensors, on the TP ranks in ``destinations``: written into ``out``'s
    views there (this rank's shards and its TP peers', merged by the mapping — straight into the output where
    a merge is one output tensor — and cast on the copy); the other TP ranks only send their shards."""
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    local = [tensor_of(exported[entry.index][0]) for entry in bucket]
    sharded = [i for i, entry in enumerate(bucket) if entry.tp_sharded and tp_size > 1]
    buffers.exchange.reserve(sum((tp_size + 1) * (local[i].nbytes + Arena.ALIGN) for i in sharded))
    shards = _exchange_shards(local, sharded, destinations, buffers.exchange)
    if out is None:
        return
    buffers.merge.reserve(sum(spec.nbytes + Arena.ALIGN for entry in bucket for spec in entry.specs))
    views = iter(view for _, view in out)
    for i, entry in enumerate(bucket):
        entry_views = [next(views) for _ in entry.specs]
        pending = list(entry_views)

        def allocate(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            """Merge straight into the output when a merged tensor is one (row, gate/up); else scratch."""
            if pending and tuple(pending[0].shape) == tuple(shape) and pending[0].dtype == dtype:
                return pending.pop(0)
            return buffers.merge.allocate(shape, dtype)

        for tensor, view in zip(megatron_to_hf(entry.mapping, shards.get(i, [local[i]]), layout, allocate), entry_views):
            if tensor.data_ptr() != view.data_ptr():
                view.copy_(tensor)


def _stream_through_collectives(model, layout, buckets, device, tensor_of, receivers) -> Iterator[Bucket]:
    """Per bucket of stage s: in each data-parallel replica holding receivers, the stage's TP ranks on those
    receivers' pipeline lines gather the full tensors from their TP peers; each sends them along its line to
    the receivers at other stages."""
    exported = _exported(model, layout)
    coords = _coordinates()
    pp_rank, tp_rank, dp_rank = coords[dist.get_rank()]
    line = dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())  # global rank per stage
    line_receivers = [r for r in receivers if coords[r][1:] == (tp_rank, dp_rank)]
    destinations = {coords[r][1] for r in receivers if coords[r][2] == dp_rank}  # TP ranks whose line receives
    me = dist.get_rank()
    buffers = _buffers_on(device)
    for bucket in buckets:
        stage = bucket[0].stage
        assembles = stage == pp_rank and tp_rank in destinations
        if stage == pp_rank and destinations and not assembles:
            _assemble_stage_bucket(bucket, exported, layout, tensor_of, None, destinations, buffers)  # send shards
        if not assembles and me not in receivers:
            continue
        specs = [spec for entry in bucket for spec in entry.specs]
        buffers.out.reserve(sum(spec.nbytes + Arena.ALIGN for spec in specs))
        flat_buffers = _flat_buffers(specs, buffers.out)
        out = _unflatten(specs, flat_buffers)
        if assembles:
            _assemble_stage_bucket(bucket, exported, layout, tensor_of, out, destinations, buffers)
        for receiver in line_receivers:  # along this rank's pipeline line, from the stage's rank
            if coords[receiver][0] == stage:
                continue
            for flat in flat_buffers.values():
                if assembles:
                    dist.send(flat, dst=receiver)
                elif me == receiver:
                    dist.recv(flat, src=line[stage])
        if me in receivers:
            yield out


_REGIONS = SharedRegions()
_ARENA = Arena()


def _stream_through_shared_memory(model, layout, buckets, tensor_of, receivers) -> Iterator[Bucket]:
    """Owners (data-parallel rank 0 of each stage, every TP rank) write their shards of a bucket into their
    shared region; each receiver merges them into its reused arena and yields views. Two barriers per bucket
    keep a region from being overwritten while it is read (docs/pitfalls.md, 15: the same rule on CPU)."""
    exported = _exported(model, layout)
    coords = _coordinates()
    pp_rank = coords[dist.get_rank()][0]
    owner = parallel_state.get_data_parallel_rank() == 0
    owner_rank = {(pp, tp): rank for rank, (pp, tp, dp) in enumerate(coords) if dp == 0}
    need = max((sum(e.shard.nbytes for e in bucket) for bucket in buckets if bucket[0].stage == pp_rank), default=0)
    _REGIONS.publish(need if owner else 0, readers=set(receivers))
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    receives = dist.get_rank() in receivers
    for bucket in buckets:
        stage = bucket[0].stage
        if owner and stage == pp_rank:
            offset = 0
            for entry in bucket:
                _REGIONS.view(dist.get_rank(), offset, entry.shard.shape, entry.shard.dtype).copy_(tensor_of(exported[entry.index][0]))
                offset += entry.shard.nbytes
        dist.barrier()
        if receives:
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

