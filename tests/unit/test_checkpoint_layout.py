"""The converters' view of a Qwen3-MoE torch_dist checkpoint: keys, shapes and per-(layer, expert) items, and
HF weights that disagree with the config refused before anything is written, naming the field."""

import pytest
import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from megatron_dapo.errors import CheckpointMismatchError
from megatron_dapo.model_config import ModelLayout
from megatron_dapo.weights.checkpoint_reader import EXPERT_KEY, megatron_shapes, tensor_order
from megatron_dapo.weights.checkpoint_writer import check_hf_weights_match_config
from megatron_dapo.weights.hf_mapping import DictReader

from ..helpers import checkpoint_named


def _config(**changes) -> Qwen3MoeConfig:
    fields = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, intermediate_size=32, moe_intermediate_size=12, num_experts=4, num_experts_per_tok=2,
                  tie_word_embeddings=False)
    return Qwen3MoeConfig(**{**fields, **changes})


def test_expert_keys_carry_a_layer_and_an_expert_axis_and_every_hf_tensor_is_covered_once():
    config = _config()
    shapes = megatron_shapes(config)
    assert shapes[f"{EXPERT_KEY}linear_fc1.weight"][0] == (2, 4, 24, 16)  # [layers, experts, gate;up, hidden]
    assert shapes[f"{EXPERT_KEY}linear_fc2.weight"][0] == (2, 4, 16, 12)
    assert shapes["decoder.layers.self_attention.q_layernorm.weight"][0] == (2, 8)
    assert "decoder.layers.mlp.linear_fc1.weight" not in shapes  # no dense MLP in a MoE layer
    layout = ModelLayout.from_hf_config(config)
    covered = [name for item in tensor_order(config) for name in item.mapping(layout).hf_names]
    expected = checkpoint_named(dict(Qwen3MoeForCausalLM(config).state_dict()))
    assert sorted(covered) == sorted(expected)  # each HF tensor exactly once


def test_hf_weights_of_another_moe_shape_are_refused_naming_the_field():
    tensors = checkpoint_named(dict(Qwen3MoeForCausalLM(_config()).state_dict()))
    with pytest.raises(CheckpointMismatchError, match="moe_intermediate_size"):
        check_hf_weights_match_config(DictReader(tensors), _config(moe_intermediate_size=8), "weights")
    with pytest.raises(CheckpointMismatchError, match=r"mlp.gate.weight has shape \(4, 16\), the config's num_experts"):
        check_hf_weights_match_config(DictReader(tensors), _config(num_experts=6), "weights")
    del tensors["model.layers.0.mlp.experts.3.down_proj.weight"]
    with pytest.raises(CheckpointMismatchError, match="mlp.experts.3.down_proj.weight"):
        check_hf_weights_match_config(DictReader(tensors), _config(), "weights")
