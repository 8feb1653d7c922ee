"""The one Megatron ⇄ Hugging Face name and layout mapping (Qwen2/Qwen2.5, Llama, Qwen3, Qwen3-MoE).

A Megatron parameter (by its name inside one pipeline stage) maps to one or more HF tensors and a layout
``kind`` saying how its tensor-parallel shard is built from them and how all shards merge back:

- ``replicated``: norms; identical on every TP rank.
- ``vocab``: embedding / output rows, padded to Megatron's padded vocabulary, split by rows. Padding is
  stripped on export (docs/pitfalls.md, 9).
- ``row``: row-parallel linears (``linear_proj``, ``linear_fc2``), split by columns.
- ``qkv``: HF q/k/v interleaved per KV group as ``[q_1 … q_{h/g}, k, v] × g`` (weight and bias), then split
  by rows: a TP shard owns whole KV groups (docs/pitfalls.md, 7).
- ``gate_up``: each TP shard is ``[gate_r; up_r]`` (docs/pitfalls.md, 8).

``hf_to_megatron`` reads through a ``TensorReader`` and asks only for the rows/columns its TP shard needs,
so a rank importing a 32B checkpoint reads its slices, not whole tensors.

Both layer specs are covered: the local spec's ``input_layernorm``/``pre_mlp_layernorm`` and Transformer
Engine's fused ``linear_qkv.layer_norm_weight``/``linear_fc1.layer_norm_weight``.

MoE layers: the router (``mlp.router.weight``, replicated) is HF's ``mlp.gate.weight``; each expert's
``linear_fc1``/``linear_fc2`` is a ``gate_up``/``row`` parameter of its own, split over the *expert*
tensor-parallel group, named ``mlp.experts.local_experts.<i>.linear_fc*.weight`` by the local spec's
``SequentialMLP`` and ``mlp.experts.linear_fc*.weight<i>`` by Transformer Engine's ``TEGroupedMLP``. ``<i>`` is
the rank's local expert; the HF expert is ``expert_offset + i`` (``expert_offset``: EP rank × local experts).
HF checkpoints store experts one by one (``mlp.experts.<e>.{gate,up,down}_proj.weight``); transformers 5
fuses them in memory only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from megatron_dapo.errors import CheckpointMismatchError, different_models
from megatron_dapo.model_config import ModelLayout

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# Megatron per-layer suffix -> (kind, HF per-layer suffixes)
_LAYER_MAP: dict[str, tuple[str, tuple[str, ...]]] = {
    "input_layernorm.weight": ("replicated", ("input_layernorm.weight",)),
    "self_attention.linear_qkv.layer_norm_weight": ("replicated", ("input_layernorm.weight",)),
    "self_attention.linear_qkv.weight": (
        "qkv",
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    ),
    "self_attention.linear_qkv.bias": (
        "qkv",
        ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    ),
    "self_attention.linear_proj.weight": ("row", ("self_attn.o_proj.weight",)),
    "self_attention.q_layernorm.weight": ("replicated", ("self_attn.q_norm.weight",)),
    "self_attention.k_layernorm.weight": ("replicated", ("self_attn.k_norm.weight",)),
    "mlp.router.weight": ("replicated", ("mlp.gate.weight",)),
    "pre_mlp_layernorm.weight": ("replicated", ("post_attention_layernorm.weight",)),
    "mlp.linear_fc1.layer_norm_weight": ("replicated", ("post_attention_layernorm.weight",)),
    "mlp.linear_fc1.weight": ("gate_up", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    "mlp.linear_fc2.weight": ("row", ("mlp.down_proj.weight",)),
}
# local spec (SequentialMLP) and Transformer Engine (TEGroupedMLP) expert names -> the HF per-expert suffixes
_EXPERT = re.compile(r"^mlp\.experts\.(?:local_experts\.(\d+)\.(linear_fc[12])\.weight|(linear_fc[12])\.weight(\d+))$")
_EXPERT_MAP: dict[str, tuple[str, tuple[str, ...]]] = {
    "linear_fc1": ("gate_up", ("gate_proj.weight", "up_proj.weight")),
    "linear_fc2": ("row", ("down_proj.weight",)),
}
_GLOBAL_MAP: dict[str, tuple[str, tuple[str, ...]]] = {
    "embedding.word_embeddings.weight": ("vocab", ("model.embed_tokens.weight",)),
    "decoder.final_layernorm.weight": ("replicated", ("model.norm.weight",)),
    "output_layer.weight": ("vocab", ("lm_head.weight",)),
}


@dataclass(frozen=True)
class ParamMapping:
    """How one Megatron parameter relates to HF tensors."""

    megatron_name: str
    kind: str
    hf_names: tuple[str, ...]
    expert: int | None = None  # the HF expert of an expert parameter (split over expert TP, owned by one EP rank)


def param_mapping(
    megatron_name: str, global_layer_index: int | None, layout: ModelLayout, expert_offset: int = 0
) -> ParamMapping:
    """Mapping of a stage-local Megatron parameter name; ``global_layer_index`` for ``decoder.layers.*``,
    ``expert_offset`` (this EP rank's first expert) for expert parameters.

    With tied embeddings the output layer (a copy Megatron keeps on the last pipeline stage) maps to
    ``model.embed_tokens.weight``: HF has no ``lm_head.weight`` then (docs/pitfalls.md, 10).
    """
    match = _LAYER.match(megatron_name)
    if match:
        suffix = match.group(2)
        expert = _EXPERT.match(suffix)
        if expert:
            local_index, linear = (expert.group(1), expert.group(2)) if expert.group(1) else (expert.group(4), expert.group(3))
            index = expert_offset + int(local_index)
            kind, hf_suffixes = _EXPERT_MAP[linear]
            prefix = f"model.layers.{global_layer_index}.mlp.experts.{index}."
            return ParamMapping(megatron_name, kind, tuple(prefix + s for s in hf_suffixes), expert=index)
        if suffix not in _LAYER_MAP:
            raise KeyError(f"no Hugging Face mapping for Megatron parameter {megatron_name!r}")
        kind, hf_suffixes = _LAYER_MAP[suffix]
        prefix = f"model.layers.{global_layer_index}."
        return ParamMapping(megatron_name, kind, tuple(prefix + s for s in hf_suffixes))
    if megatron_name not in _GLOBAL_MAP:
        raise KeyError(f"no Hugging Face mapping for Megatron parameter {megatron_name!r}")
    kind, hf_names = _GLOBAL_MAP[megatron_name]
    if megatron_name == "output_layer.weight" and layout.tie_word_embeddings:
        hf_names = ("model.embed_tokens.weight",)
    return ParamMapping(megatron_name, kind, hf_names)


def for_expert(mapping: ParamMapping, expert: int) -> ParamMapping:
    """The same expert parameter of another expert (the one another EP rank holds at this local index)."""
    old, new = f".mlp.experts.{mapping.expert}.", f".mlp.experts.{expert}."
    return ParamMapping(mapping.megatron_name, mapping.kind, tuple(n.replace(old, new) for n in mapping.hf_names), expert)


class TensorReader(Protocol):
    """Read access to HF tensors by name, a slice at a time (safetensors files, or tensors in memory)."""

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str, dim: int = 0, start: int = 0, stop: int | None = None) -> torch.Tensor: ...


class DictReader:
    """``TensorReader`` over HF-named tensors in memory."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.tensors:
            raise CheckpointMismatchError(f"no tensor {name!r} among the Hugging Face weights")
        return tuple(self.tensors[name].shape)

    def read(self, name: str, dim: int = 0, start: int = 0, stop: int | None = None) -> torch.Tensor:
        stop = check_slice(name, self.shape(name), dim, start, stop)
        return self.tensors[name].narrow(dim, start, stop - start)


def check_slice(name: str, shape: tuple[int, ...], dim: int, start: int, stop: int | None) -> int:
    """The slice end (``stop`` or the full length), refusing slices beyond the tensor."""
    size = shape[dim] if shape else 1
    stop = size if stop is None else stop
    if stop > size:
        raise different_models(f"tensor {name!r} has {size} entries along dim {dim}, the config needs {stop}", "weights")
    return stop


def _interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: ModelLayout) -> torch.Tensor:
    d = layout.head_dim
    per_group = layout.num_attention_heads // layout.num_key_value_heads
    groups = k.shape[0] // d  # the KV groups present (all of them, or one TP shard's)
    trailing = q.shape[1:]
    qkv = torch.cat(
        [q.reshape(groups, per_group, d, *trailing), k.reshape(groups, 1, d, *trailing), v.reshape(groups, 1, d, *trailing)],
        dim=1,
    )
    return qkv.reshape(-1, *trailing)


def _split_qkv(qkv: torch.Tensor, layout: ModelLayout) -> list[torch.Tensor]:
    groups, d = layout.num_key_value_heads, layout.head_dim
    per_group = layout.num_attention_heads // groups
    trailing = qkv.shape[1:]
    q, k, v = qkv.reshape(groups, per_group + 2, d, *trailing).split([per_group, 1, 1], dim=1)
    return [t.reshape(-1, *trailing) for t in (q, k, v)]


def _tp_part(reader: TensorReader, name: str, dim: int, tp_rank: int, part_size: int) -> torch.Tensor:
    start = tp_rank * part_size
    return reader.read(name, dim, start, start + part_size)


def hf_to_megatron(
    mapping: ParamMapping,
    reader: TensorReader,
    layout: ModelLayout,
    tp_rank: int,
    tp_size: int,
    padded_rows: int | None = None,
) -> torch.Tensor:
    """TP shard ``tp_rank`` of ``mapping.megatron_name``, reading only the slices of HF tensors it needs.

    ``padded_rows`` is Megatron's full padded vocabulary size, needed for ``vocab`` parameters.
    """
    kind, names = mapping.kind, mapping.hf_names
    if kind == "replicated":
        return reader.read(names[0])
    if kind == "vocab":
        rows = reader.shape(names[0])[0]
        if rows != layout.vocab_size:
            raise different_models(f"model config field 'vocab_size' is {layout.vocab_size} but {names[0]} has {rows} rows", "weights")
        if padded_rows is None or padded_rows < rows or padded_rows % tp_size:
            raise ValueError(f"{mapping.megatron_name}: padded vocabulary {padded_rows} does not fit {rows} rows / TP {tp_size}")
        per_rank = padded_rows // tp_size
        start, stop = tp_rank * per_rank, min((tp_rank + 1) * per_rank, rows)
        real = reader.read(names[0], 0, start, stop) if start < stop else None
        width = reader.shape(names[0])[1:]
        shard = torch.zeros((per_rank, *width), dtype=real.dtype if real is not None else torch.float32)
        if real is not None:
            shard[: real.shape[0]] = real
        return shard
    if kind == "row":
        return _tp_part(reader, names[0], 1, tp_rank, reader.shape(names[0])[1] // tp_size)
    if kind == "gate_up":
        rows = reader.shape(names[0])[0] // tp_size
        return torch.cat([_tp_part(reader, name, 0, tp_rank, rows) for name in names], dim=0)
    if kind == "qkv":
        groups_per_rank = layout.num_key_value_heads // tp_size
        q_rows = groups_per_rank * (layout.num_attention_heads // layout.num_key_value_heads) * layout.head_dim
        kv_rows = groups_per_rank * layout.head_dim
        q = _tp_part(reader, names[0], 0, tp_rank, q_rows)
        k, v = (_tp_part(reader, name, 0, tp_rank, kv_rows) for name in names[1:])
        return _interleave_qkv(q, k, v, layout)
    raise ValueError(f"unknown layout kind {kind!r}")


Allocate = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


def _cat(tensors: list[torch.Tensor] | tuple[torch.Tensor, ...], dim: int, allocate: Allocate | None) -> torch.Tensor:
    """``torch.cat`` (into ``allocate``'s buffer when given), without a copy for a single tensor."""
    if len(tensors) == 1:
        return tensors[0]
    if allocate is None:
        return torch.cat(tensors, dim=dim)
    shape = list(tensors[0].shape)
    shape[dim] = sum(t.shape[dim] for t in tensors)
    return torch.cat(tensors, dim=dim, out=allocate(tuple(shape), tensors[0].dtype))


def megatron_to_hf(
    mapping: ParamMapping, shards: list[torch.Tensor], layout: ModelLayout, allocate: Allocate | None = None
) -> list[torch.Tensor]:
    """Merge all TP shards (in TP-rank order) of one Megatron parameter into its HF tensors (views when TP=1).

    ``allocate(shape, dtype)`` supplies the merge buffers (e.g. from a reused arena); default: fresh ones.
    """
    kind = mapping.kind
    if kind == "replicated":
        return [shards[0]]
    if kind == "vocab":
        return [_cat(shards, 0, allocate)[: layout.vocab_size]]
    if kind == "row":
        return [_cat(shards, 1, allocate)]
    if kind == "gate_up":
        gates, ups = zip(*(shard.chunk(2, dim=0) for shard in shards))
        return [_cat(gates, 0, allocate), _cat(ups, 0, allocate)]
    if kind == "qkv":
        return _split_qkv(_cat(shards, 0, allocate), layout)
    raise ValueError(f"unknown layout kind {kind!r}")
