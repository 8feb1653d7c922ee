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
from typing import Callable, Collection, Iterator, Literal, NamedTuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_dapo.errors import ConfigError, NonFiniteWeightsError, different_models
from megatron_dapo.model_config import ModelLayout
from megatron_dapo.weights.hf_mapping import (
    Allocate,
    ParamMapping,
    TensorReader,
    for_expert,
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
    """One Megatron parameter of a stage, its local shard, and the HF tensors it becomes.

    A dense parameter is split over TP; an expert parameter over the expert tensor-and-model-parallel group
    (EP × ETP): the EP ranks hold different experts at the same local index, so the entry stands for all of
    them, with one mapping per EP rank (``mappings``, EP-rank order) and their HF tensors in that order."""

    stage: int
    index: int  # position among the stage's exported parameters
    specs: tuple[TensorSpec, ...]
    shard: TensorSpec  # this stage's local tensor (every rank of the group has this shape)
    sharded: bool  # its group has more than one rank holding a part
    mappings: tuple[ParamMapping, ...]

    @property
    def expert(self) -> bool:
        return self.mappings[0].expert is not None


def _exported(model: ModelChunks, layout: ModelLayout) -> list[tuple[torch.nn.Parameter, ParamMapping]]:
    """The stage's parameters that appear in the HF checkpoint (a tied output layer is the embedding)."""
    return [
        (param, mapping)
        for param, mapping in local_param_mappings(model, layout)
        if not (mapping.megatron_name == "output_layer.weight" and layout.tie_word_embeddings)
    ]


def _group_mappings(param: torch.Tensor, mapping: ParamMapping, layout: ModelLayout) -> tuple[tuple[ParamMapping, ...], int]:
    """The mappings the parameter's group holds between them (one per EP rank for an expert) and how many
    ranks split each of those (TP or ETP; 1 for a replicated parameter)."""
    if mapping.expert is None:
        split = getattr(param, "tensor_model_parallel", False)
        return (mapping,), parallel_state.get_tensor_model_parallel_world_size() if split else 1
    ep_size = parallel_state.get_expert_model_parallel_world_size()
    local_experts = layout.num_experts // ep_size
    local_index = mapping.expert - parallel_state.get_expert_model_parallel_rank() * local_experts
    mappings = tuple(for_expert(mapping, rank * local_experts + local_index) for rank in range(ep_size))
    return mappings, parallel_state.get_expert_tensor_parallel_world_size()


def _hf_specs(param: torch.Tensor, mappings: tuple[ParamMapping, ...], split: int, layout: ModelLayout,
              dtype: torch.dtype) -> tuple[TensorSpec, ...]:
    meta = [torch.empty(param.shape, device="meta")] * split
    return tuple(
        TensorSpec(name, tuple(tensor.shape), dtype)
        for mapping in mappings
        for name, tensor in zip(mapping.hf_names, megatron_to_hf(mapping, meta, layout))
    )


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
        mappings, split = _group_mappings(param, mapping, layout)
        local.append((_hf_specs(param, mappings, split, layout, dtype), TensorSpec(mapping.megatron_name, tuple(shard.shape), shard.dtype),
                      len(mappings) * split > 1, mappings))
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


class _Coordinates(NamedTuple):
    """Where a rank sits in megatron's groups: the dense layout (pp, tp, dp) and the experts' (ep, etp, edp)."""

    pp: int
    tp: int
    dp: int
    ep: int
    etp: int
    edp: int


def _coordinates() -> list[_Coordinates]:
    """The coordinates of every global rank (collective)."""
    coords = [None] * dist.get_world_size()
    mine = _Coordinates(
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
        parallel_state.get_expert_model_parallel_rank(),
        parallel_state.get_expert_tensor_parallel_rank(),
        parallel_state.get_expert_data_parallel_rank(),
    )
    dist.all_gather_object(coords, tuple(mine))
    return [_Coordinates(*c) for c in coords]


def _shard_group(expert: bool) -> dist.ProcessGroup:
    """The ranks that split a parameter between them: TP for dense ones, EP × ETP for experts."""
    if expert:
        return parallel_state.get_expert_tensor_and_model_parallel_group()
    return parallel_state.get_tensor_model_parallel_group()


def _expert_order(group: dist.ProcessGroup, coords: list[_Coordinates]) -> list[int]:
    """Group ranks of the expert group in (EP rank, ETP rank) order: the order ``_Entry.mappings`` and the merge
    of each expert's ETP shards expect, whatever order megatron's rank generator gave the group."""
    members = dist.get_process_group_ranks(group)
    return sorted(range(len(members)), key=lambda i: (coords[members[i]].ep, coords[members[i]].etp))


def _merged(entry: _Entry, shards: list[torch.Tensor], layout: ModelLayout, allocate: Allocate | None) -> Iterator[torch.Tensor]:
    """The entry's HF tensors from all its shards (for experts: EP-rank-major, ETP-minor order)."""
    per_mapping = len(shards) // len(entry.mappings)
    for position, mapping in enumerate(entry.mappings):
        yield from megatron_to_hf(mapping, shards[position * per_mapping : (position + 1) * per_mapping], layout, allocate)


class _Buffers:
    """The collectives transport's reused buffers: a bucket's full tensors (``out``), the shard exchange
    (``exchange``) and the mapping's merge scratch (``merge``). Each is valid until the next bucket."""

    def __init__(self, device: torch.device) -> None:
        self.out, self.exchange, self.merge = Arena(device), Arena(device), Arena(device)


_HOST_BUFFERS = _Buffers(torch.device("cpu"))  # CPU jobs keep them across syncs: pages fault in once


def _buffers_on(device: torch.device) -> _Buffers:
    """Host buffers are kept; GPU buffers live for one sync, so that the memory is free for the engine."""
    return _HOST_BUFFERS if device.type == "cpu" else _Buffers(device)


def _exchange_shards(
    local: list[torch.Tensor], sharded: list[int], destinations: set[int], arena: Arena, group: dist.ProcessGroup
) -> dict[int, list[torch.Tensor]]:
    """For each ``local[i]`` (``i`` in ``sharded``): every ``group`` rank's shard, in group-rank order, on the group
    ranks in ``destinations`` (the other ranks only send and get ``[]``).

    To every group rank over NCCL: one ``all_gather_into_tensor`` per dtype of packed shards. Otherwise one
    send/receive pair per shard and peer, straight from the parameters (no packing copy); on gloo these also
    move the bytes 3–4× faster than its all-gather between processes of one host (measured: 150 MB per rank,
    2 ranks, 0.18 s against 0.53–0.65 s).
    """
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if not sharded or not destinations:
        return {}
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
    bucket: list[_Entry], exported, layout: ModelLayout, tensor_of, out: Bucket | None, assemblers: set[int],
    coords: list[_Coordinates], buffers: _Buffers,
) -> None:
    """A bucket of this stage as full HF tensors on the ``assemblers`` (global ranks): written into ``out``'s
    views there (this rank's shards and its group peers', merged by the mapping — straight into the output where
    a merge is one output tensor — and cast on the copy); the other ranks of the stage only send their shards."""
    local = [tensor_of(exported[entry.index][0]) for entry in bucket]
    sharded = [i for i, entry in enumerate(bucket) if entry.sharded]
    if out is not None or dist.get_backend() == "nccl":  # p2p senders need no buffer; NCCL's all-gather does
        buffers.exchange.reserve(sum((dist.get_world_size(_shard_group(bucket[i].expert)) + 1) * (local[i].nbytes + Arena.ALIGN)
                                     for i in sharded))
    shards: dict[int, list[torch.Tensor]] = {}
    for expert in (False, True):
        group = _shard_group(expert)
        destinations = {i for i, rank in enumerate(dist.get_process_group_ranks(group)) if rank in assemblers}
        exchanged = _exchange_shards(local, [i for i in sharded if bucket[i].expert == expert], destinations,
                                     buffers.exchange, group)
        if expert and exchanged and out is not None:
            order = _expert_order(group, coords)
            exchanged = {i: [parts[k] for k in order] for i, parts in exchanged.items()}
        shards.update(exchanged)
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

        for tensor, view in zip(_merged(entry, shards.get(i, [local[i]]), layout, allocate), entry_views):
            if tensor.data_ptr() != view.data_ptr():
                view.copy_(tensor)


def _stream_through_collectives(model, layout, buckets, device, tensor_of, receivers) -> Iterator[Bucket]:
    """Per bucket of stage s: the stage's ranks on the receivers' pipeline lines (the assemblers) gather the full
    tensors from their shard groups (TP peers; for experts, the EP × ETP peers, which hold the other experts);
    each sends them along its line to the receivers at other stages."""
    exported = _exported(model, layout)
    coords = _coordinates()
    me = dist.get_rank()
    pp_rank, tp_rank, dp_rank = coords[me][:3]
    line = dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())  # global rank per stage
    line_receivers = [r for r in receivers if coords[r][1:3] == (tp_rank, dp_rank)]
    receiving_lines = {coords[r][1:3] for r in receivers}
    assemblers = {rank for rank, c in enumerate(coords) if c.pp == pp_rank and (c.tp, c.dp) in receiving_lines}
    buffers = _buffers_on(device)
    for bucket in buckets:
        stage = bucket[0].stage
        assembles = stage == pp_rank and me in assemblers
        if stage == pp_rank and not assembles:
            _assemble_stage_bucket(bucket, exported, layout, tensor_of, None, assemblers, coords, buffers)  # send shards
        if not assembles and me not in receivers:
            continue
        specs = [spec for entry in bucket for spec in entry.specs]
        buffers.out.reserve(sum(spec.nbytes + Arena.ALIGN for spec in specs))
        flat_buffers = _flat_buffers(specs, buffers.out)
        out = _unflatten(specs, flat_buffers)
        if assembles:
            _assemble_stage_bucket(bucket, exported, layout, tensor_of, out, assemblers, coords, buffers)
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
    """Owners write their shards of a bucket into their shared region — data-parallel rank 0 of each stage and
    TP rank for dense parameters, expert-data-parallel rank 0 of each stage, EP and ETP rank for experts — and
    each receiver merges them into its reused arena and yields views. Two barriers per bucket keep a region from
    being overwritten while it is read (docs/pitfalls.md, 15: the same rule on CPU)."""
    exported = _exported(model, layout)
    coords = _coordinates()
    mine = coords[dist.get_rank()]
    dense_owner, expert_owner = mine.dp == 0, mine.edp == 0
    owner_rank = {(c.pp, c.tp): rank for rank, c in enumerate(coords) if c.dp == 0}
    expert_owner_rank = {(c.pp, c.ep, c.etp): rank for rank, c in enumerate(coords) if c.edp == 0}
    need = max((sum(e.shard.nbytes for e in bucket) for bucket in buckets if bucket[0].stage == mine.pp), default=0)
    _REGIONS.publish(need if dense_owner or expert_owner else 0, readers=set(receivers))
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    ep_size = parallel_state.get_expert_model_parallel_world_size()
    etp_size = parallel_state.get_expert_tensor_parallel_world_size()
    receives = dist.get_rank() in receivers
    for bucket in buckets:
        stage = bucket[0].stage
        if stage == mine.pp:
            offset = 0
            for entry in bucket:
                if expert_owner if entry.expert else dense_owner:
                    _REGIONS.view(dist.get_rank(), offset, entry.shard.shape, entry.shard.dtype).copy_(tensor_of(exported[entry.index][0]))
                offset += entry.shard.nbytes
        dist.barrier()
        if receives:
            _ARENA.reserve(sum(spec.nbytes + Arena.ALIGN for entry in bucket for spec in entry.specs))
            named: Bucket = []
            offset = 0
            for entry in bucket:
                if entry.expert:
                    ranks = [expert_owner_rank[(stage, ep, etp)] for ep in range(ep_size) for etp in range(etp_size)]
                else:
                    ranks = [owner_rank[(stage, tp)] for tp in range(tp_size if entry.sharded else 1)]
                shards = [_REGIONS.view(rank, offset, entry.shard.shape, entry.shard.dtype) for rank in ranks]
                offset += entry.shard.nbytes
                tensors = _merged(entry, shards, layout, _ARENA.allocate)
                named += [(spec.name, tensor.to(spec.dtype)) for spec, tensor in zip(entry.specs, tensors)]
            yield named  # views into the regions and the arena: the owners wait below until it is consumed
        dist.barrier()


def hf_specs(model: ModelChunks, layout: ModelLayout, dtype: torch.dtype = torch.float32) -> list[TensorSpec]:
    """Names, shapes and dtypes of the full HF tensors, in ``stream_hf_buckets`` order (collective)."""
    return [spec for entry in hf_plan(model, layout, dtype) for spec in entry.specs]

