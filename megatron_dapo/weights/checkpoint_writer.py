"""Write Hugging Face weights as a Megatron torch_dist checkpoint that loads under any TP/PP layout.

Tensors are described in the TP=1 layout at their layer offset (see ``checkpoint_reader``); megatron-core
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
from megatron_dapo.weights.checkpoint_reader import LAYER_KEY, checkpoint_param_mapping, megatron_shapes, tensor_order
from megatron_dapo.weights.hf_mapping import TensorReader, hf_to_megatron, megatron_to_hf


def check_hf_weights_match_config(reader: TensorReader, hf_config: PretrainedConfig, source: str) -> None:
    """Refuse HF weights whose shapes do not follow ``hf_config`` (before anything is written)."""
    layout = ModelLayout.from_hf_config(hf_config)
    for key, (shape, fields) in megatron_shapes(hf_config).items():
        layer = 0 if key.startswith(LAYER_KEY) else None
        mapping = checkpoint_param_mapping(key, layer, layout)
        want = shape[1:] if layer is not None else shape
        placeholders = [torch.empty(want, device="meta")]
        for name, expected in zip(mapping.hf_names, megatron_to_hf(mapping, placeholders, layout)):
            got = reader.shape(name)
            if got != tuple(expected.shape):
                raise different_models(f"{source}: {name} has shape {got}, the config's {fields} imply {tuple(expected.shape)}", "weights")
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
    for key, layer in tensor_order(hf_config):
        tensor = hf_to_megatron(checkpoint_param_mapping(key, layer, layout), reader, layout, 0, 1, padded_rows)
        tensor = tensor.to(dtype) if dtype is not None else tensor
        if layer is None:
            state[key] = ShardedTensor.from_rank_offsets(key, tensor.contiguous(), replica_id=0)
        else:
            state[f"{key}.{layer}"] = ShardedTensor.from_rank_offsets(
                key, tensor.contiguous(), (0, layer, num_layers), replica_id=0, prepend_axis_num=1
            )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save({"model": state}, str(out_dir))
