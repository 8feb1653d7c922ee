"""Write Hugging Face weights as a Megatron torch_dist checkpoint that loads under any TP/PP/EP layout.

Tensors are described in the TP=1 layout at their layer (and expert) offset (see ``checkpoint_reader``); megatron-core
reshards them at load time.
"""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedTensor
from transformers import PretrainedConfig

from megatron_dapo.errors import different_models
from megatron_dapo.model_config import ModelLayout, padded_vocab_size, validate_hf_config
from megatron_dapo.weights.checkpoint_reader import megatron_shapes, tensor_order
from megatron_dapo.weights.hf_mapping import TensorReader, hf_to_megatron, megatron_to_hf


def check_hf_weights_match_config(reader: TensorReader, hf_config: PretrainedConfig, source: str) -> None:
    """Refuse HF weights whose shapes do not follow ``hf_config`` (before anything is written)."""
    layout = ModelLayout.from_hf_config(hf_config)
    shapes = megatron_shapes(hf_config)
    first_of_each_key = {item.key: item for item in reversed(tensor_order(hf_config))}
    for key, item in first_of_each_key.items():
        mapping = item.mapping(layout)
        placeholders = [torch.empty(shapes[key][0][item.leading_axes:], device="meta")]
        for name, expected in zip(mapping.hf_names, megatron_to_hf(mapping, placeholders, layout)):
            got = reader.shape(name)
            if got != tuple(expected.shape):
                raise different_models(
                    f"{source}: {name} has shape {got}, the config's {shapes[key][1]} imply {tuple(expected.shape)}", "weights"
                )
    # each raises naming the tensor when the weights have fewer layers or experts
    reader.shape(f"model.layers.{hf_config.num_hidden_layers - 1}.input_layernorm.weight")
    if layout.num_experts:
        reader.shape(f"model.layers.0.mlp.experts.{layout.num_experts - 1}.down_proj.weight")


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
    leading_sizes = (hf_config.num_hidden_layers, layout.num_experts)
    state = {}
    for item in tensor_order(hf_config):
        tensor = hf_to_megatron(item.mapping(layout), reader, layout, 0, 1, padded_rows)
        tensor = tensor.to(dtype) if dtype is not None else tensor
        indices = [i for i in (item.layer, item.expert) if i is not None]
        offsets = [(axis, index, leading_sizes[axis]) for axis, index in enumerate(indices)]
        state[".".join(map(str, [item.key, *indices]))] = ShardedTensor.from_rank_offsets(
            item.key, tensor.contiguous(), *offsets, replica_id=0, prepend_axis_num=len(offsets)
        )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save({"model": state}, str(out_dir))
