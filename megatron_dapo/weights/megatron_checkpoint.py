"""Offline conversion between Megatron torch_dist checkpoints and Hugging Face folders, one tensor at a time.

A torch_dist checkpoint stores each parameter as one global tensor, whatever TP/PP saved it: layer
parameters are stacked on a leading layer axis, TP shards sit at their offsets, and ``linear_fc1`` is
``[gate; up]`` — i.e. the TP=1 layout. Reading asks torch.distributed.checkpoint (the format under
torch_dist) for one layer's box of one key, so peak memory stays near one tensor and no process group is
needed. Writing describes TP=1 tensors by their layer offset; megatron reshards them to any TP/PP at
load time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedTensor
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from transformers import PretrainedConfig

from megatron_dapo.actor.model import padded_vocab_size, validate_hf_config
from megatron_dapo.weights.hf_mapping import (
    CheckpointMismatchError,
    ModelLayout,
    TensorReader,
    hf_to_megatron,
    megatron_to_hf,
    param_mapping,
)
from megatron_dapo.weights.safetensors_io import TensorSpec

LAYER_KEY = "decoder.layers."
EMBEDDING_KEY = "embedding.word_embeddings.weight"
OUTPUT_KEY = "output_layer.weight"
FINAL_NORM_KEY = "decoder.final_layernorm.weight"


def _has_qkv_bias(hf_config: PretrainedConfig) -> bool:
    return hf_config.model_type == "qwen2" or bool(getattr(hf_config, "attention_bias", False))


def megatron_shapes(hf_config: PretrainedConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """Checkpoint key -> (global shape without the vocabulary padding rule, config fields it follows).

    Layer keys carry the leading layer axis. Vocabulary rows are checked separately (padding).
    """
    layout = ModelLayout.from_hf_config(hf_config)
    h, ffn, layers = hf_config.hidden_size, hf_config.intermediate_size, hf_config.num_hidden_layers
    qkv_rows = (layout.num_attention_heads + 2 * layout.num_key_value_heads) * layout.head_dim
    heads = "num_attention_heads, num_key_value_heads, head_dim, hidden_size"
    shapes = {
        EMBEDDING_KEY: ((layout.vocab_size, h), "vocab_size, hidden_size"),
        f"{LAYER_KEY}self_attention.linear_qkv.layer_norm_weight": ((layers, h), "hidden_size"),
        f"{LAYER_KEY}self_attention.linear_qkv.weight": ((layers, qkv_rows, h), heads),
        f"{LAYER_KEY}self_attention.linear_proj.weight": ((layers, h, layout.num_attention_heads * layout.head_dim), heads),
        f"{LAYER_KEY}mlp.linear_fc1.layer_norm_weight": ((layers, h), "hidden_size"),
        f"{LAYER_KEY}mlp.linear_fc1.weight": ((layers, 2 * ffn, h), "intermediate_size, hidden_size"),
        f"{LAYER_KEY}mlp.linear_fc2.weight": ((layers, h, ffn), "intermediate_size, hidden_size"),
        FINAL_NORM_KEY: ((h,), "hidden_size"),
    }
    if _has_qkv_bias(hf_config):
        shapes[f"{LAYER_KEY}self_attention.linear_qkv.bias"] = ((layers, qkv_rows), heads)
    if not layout.tie_word_embeddings:
        shapes[OUTPUT_KEY] = ((layout.vocab_size, h), "vocab_size, hidden_size")
    return shapes


def _tensor_order(hf_config: PretrainedConfig) -> list[tuple[str, int | None]]:
    """(checkpoint key, layer) in HF order: embedding, layer by layer, final norm, output layer."""
    keys = list(megatron_shapes(hf_config))
    layer_keys = [k for k in keys if k.startswith(LAYER_KEY)]
    order: list[tuple[str, int | None]] = [(EMBEDDING_KEY, None)]
    order += [(key, layer) for layer in range(hf_config.num_hidden_layers) for key in layer_keys]
    order += [(k, None) for k in (FINAL_NORM_KEY, OUTPUT_KEY) if k in keys]
    return order


def _mapping(key: str, layer: int | None, layout: ModelLayout):
    name = key if layer is None else f"{LAYER_KEY}{layer}.{key[len(LAYER_KEY):]}"
    return param_mapping(name, layer, layout)


def check_checkpoint_matches_config(metadata: dict, hf_config: PretrainedConfig, source: str) -> None:
    """Refuse a checkpoint whose tensors do not have the shapes ``hf_config`` implies, naming the fields."""
    for key, (shape, fields) in megatron_shapes(hf_config).items():
        if key not in metadata:
            hint = " (tie_word_embeddings)" if key == OUTPUT_KEY else ""
            raise CheckpointMismatchError(f"{source} has no tensor {key!r}{hint}: the config and the checkpoint belong to different models")
        got = tuple(metadata[key].size)
        if key in (EMBEDDING_KEY, OUTPUT_KEY):
            if got[1:] != shape[1:] or not shape[0] <= got[0]:
                raise CheckpointMismatchError(
                    f"{source}: {key} has shape {got}, the config's {fields} imply ({shape[0]} padded, {shape[1]}): "
                    "the config and the checkpoint belong to different models"
                )
        elif key.startswith(LAYER_KEY) and got[0] != shape[0]:
            raise CheckpointMismatchError(
                f"{source} has {got[0]} layers, the config's num_hidden_layers is {shape[0]}: "
                "the config and the checkpoint belong to different models"
            )
        elif got != shape:
            raise CheckpointMismatchError(
                f"{source}: {key} has shape {got}, the config's {fields} imply {shape}: "
                "the config and the checkpoint belong to different models"
            )


class _BoxLoadPlanner(DefaultLoadPlanner):
    """Loads one box (``offsets``, ``buffer.shape``) of one checkpoint tensor into ``buffer``."""

    def __init__(self, key: str, offsets: tuple[int, ...], buffer: torch.Tensor) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False, allow_partial_load=True)
        self.key, self.offsets, self.buffer = key, offsets, buffer

    def create_local_plan(self) -> LoadPlan:
        box = ChunkStorageMetadata(offsets=torch.Size(self.offsets), sizes=self.buffer.shape)
        return LoadPlan(create_read_items_for_chunk_list(self.key, self.metadata.state_dict_metadata[self.key], [box]))

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        view = self.buffer
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            view = view.narrow(dim, start, length)
        return view


def tensors_metadata(checkpoint_dir: Path) -> dict[str, TensorStorageMetadata]:
    """Checkpoint key -> global size and dtype (model tensors and optimizer state alike)."""
    return FileSystemReader(str(checkpoint_dir)).read_metadata().state_dict_metadata


def _read(checkpoint_dir: Path, key: str, layer: int | None, meta: TensorStorageMetadata) -> torch.Tensor:
    """One layer's slice (or the whole tensor) of a checkpoint key."""
    shape = tuple(meta.size)
    box_shape = shape if layer is None else (1, *shape[1:])
    offsets = (0,) * len(shape) if layer is None else (layer,) + (0,) * (len(shape) - 1)
    buffer = torch.empty(box_shape, dtype=meta.properties.dtype)
    dcp.load({}, storage_reader=FileSystemReader(str(checkpoint_dir)), planner=_BoxLoadPlanner(key, offsets, buffer), no_dist=True)
    return buffer if layer is None else buffer[0]


def read_hf_tensors(
    checkpoint_dir: str | Path, hf_config: PretrainedConfig, dtype: torch.dtype | None = None
) -> tuple[list[TensorSpec], Iterator[tuple[str, torch.Tensor]]]:
    """HF tensor specs and a generator of HF-named tensors read one Megatron tensor at a time.

    ``dtype`` defaults to the checkpoint's.
    """
    checkpoint_dir = Path(checkpoint_dir)
    metadata = tensors_metadata(checkpoint_dir)
    check_checkpoint_matches_config(metadata, hf_config, f"checkpoint {checkpoint_dir}")
    layout = ModelLayout.from_hf_config(hf_config)
    order = _tensor_order(hf_config)
    specs = []
    for key, layer in order:
        meta = metadata[key]
        shape = tuple(meta.size) if layer is None else tuple(meta.size)[1:]
        placeholders = [torch.empty(shape, device="meta")]
        for name, tensor in zip(_mapping(key, layer, layout).hf_names, megatron_to_hf(_mapping(key, layer, layout), placeholders, layout)):
            specs.append(TensorSpec(name, tuple(tensor.shape), dtype or meta.properties.dtype))

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for key, layer in order:
            mapping = _mapping(key, layer, layout)
            megatron_tensor = _read(checkpoint_dir, key, layer, metadata[key])
            for name, tensor in zip(mapping.hf_names, megatron_to_hf(mapping, [megatron_tensor], layout)):
                yield name, tensor
            del megatron_tensor

    return specs, tensors()


def check_hf_weights_match_config(reader: TensorReader, hf_config: PretrainedConfig, source: str) -> None:
    """Refuse HF weights whose shapes do not follow ``hf_config`` (before anything is written)."""
    layout = ModelLayout.from_hf_config(hf_config)
    for key, (shape, fields) in megatron_shapes(hf_config).items():
        layer = 0 if key.startswith(LAYER_KEY) else None
        mapping = _mapping(key, layer, layout)
        want = shape[1:] if layer is not None else shape
        placeholders = [torch.empty(want, device="meta")]
        for name, expected in zip(mapping.hf_names, megatron_to_hf(mapping, placeholders, layout)):
            got = reader.shape(name)
            if got != tuple(expected.shape):
                raise CheckpointMismatchError(
                    f"{source}: {name} has shape {got}, the config's {fields} imply {tuple(expected.shape)}: "
                    "the config and the weights belong to different models"
                )
    last = f"model.layers.{hf_config.num_hidden_layers - 1}.input_layernorm.weight"
    reader.shape(last)  # raises naming the tensor when the weights have fewer layers


def write_megatron_checkpoint(
    reader: TensorReader,
    hf_config: PretrainedConfig,
    out_dir: str | Path,
    make_vocab_size_divisible_by: int = 128,
    dtype: torch.dtype | None = None,
) -> None:
    """Write the HF weights behind ``reader`` as a torch_dist checkpoint loadable under any TP/PP.

    Needs a (one-process) ``torch.distributed`` group. Every tensor is held once while megatron-core
    writes them (its save plans all tensors together).
    """
    validate_hf_config(hf_config, 1, 1)
    check_hf_weights_match_config(reader, hf_config, "Hugging Face weights")
    layout = ModelLayout.from_hf_config(hf_config)
    padded_rows = padded_vocab_size(layout.vocab_size, make_vocab_size_divisible_by, 1)
    num_layers = hf_config.num_hidden_layers
    state = {}
    for key, layer in _tensor_order(hf_config):
        tensor = hf_to_megatron(_mapping(key, layer, layout), reader, layout, 0, 1, padded_rows)
        tensor = tensor.to(dtype) if dtype is not None else tensor
        if layer is None:
            state[key] = ShardedTensor.from_rank_offsets(key, tensor.contiguous(), replica_id=0)
        else:
            state[f"{key}.{layer}"] = ShardedTensor.from_rank_offsets(
                key, tensor.contiguous(), (0, layer, num_layers), replica_id=0, prepend_axis_num=1
            )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save({"model": state}, str(out_dir))
