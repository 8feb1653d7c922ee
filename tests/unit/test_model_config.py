"""HF config → megatron TransformerConfig: values carried over, unsupported layouts refused by field."""

import re

import pytest
from transformers import LlamaConfig, Qwen2Config

from megatron_dapo.actor.model import transformer_config_from_hf
from megatron_dapo.model_config import padded_vocab_size, rope_theta


def _qwen(**kwargs):
    base = dict(vocab_size=152064, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=1e6)
    base.update(kwargs)
    return Qwen2Config(**base)


def test_qwen2_values_are_carried_over():
    config = transformer_config_from_hf(_qwen(), tp_size=2, pp_size=2)
    assert (config.num_layers, config.num_query_groups, config.kv_channels) == (4, 2, 8)
    assert config.add_qkv_bias and not config.add_bias_linear and config.gated_linear_unit
    assert config.normalization == "RMSNorm" and config.layernorm_epsilon == 1e-5
    assert config.calculate_per_token_loss
    assert rope_theta(_qwen()) == 1e6


def test_llama_has_no_qkv_bias():
    llama = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=4)
    assert not transformer_config_from_hf(llama, 1, 1).add_qkv_bias


def test_padded_vocab_matches_megatron_rule():
    assert padded_vocab_size(152064, 128, 8) == 152576  # docs/pitfalls.md, 9
    assert padded_vocab_size(152064, 128, 1) == 152064


@pytest.mark.parametrize(
    "kwargs, tp, pp, field",
    [
        ({}, 4, 1, "num_key_value_heads"),  # TP must divide the KV groups (2)
        ({"num_attention_heads": 6, "num_key_value_heads": 6}, 4, 1, "num_attention_heads"),
        ({}, 1, 3, "num_hidden_layers"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}}, 1, 1, "rope_type"),
        ({"rope_theta": 0.0}, 1, 1, "rope_theta"),  # docs/pitfalls.md, 11: a base that is no RoPE base
        ({"rms_norm_eps": 0.5}, 1, 1, "rms_norm_eps"),
    ],
)
def test_unsupported_layouts_name_the_field(kwargs, tp, pp, field):
    with pytest.raises(ValueError, match=field):
        transformer_config_from_hf(_qwen(**kwargs), tp, pp)


def _qwen3_moe(**kwargs):
    from transformers import Qwen3MoeConfig

    base = dict(vocab_size=100, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=8, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
                norm_topk_prob=True, rope_theta=1e6)
    base.update(kwargs)
    return Qwen3MoeConfig(**base)


def test_qwen3_moe_values_are_carried_over():
    config = transformer_config_from_hf(_qwen3_moe(), 1, 1, ep_size=4)
    assert config.qk_layernorm and not config.add_qkv_bias and config.kv_channels == 16
    assert (config.num_moe_experts, config.moe_router_topk, config.moe_ffn_hidden_size) == (8, 2, 32)
    assert config.expert_model_parallel_size == 4 and config.moe_router_dtype == "fp32"
    # norm_topk_prob: softmax over the chosen experts' logits; without it, the full softmax's weights
    assert not config.moe_router_pre_softmax
    assert transformer_config_from_hf(_qwen3_moe(norm_topk_prob=False), 1, 1).moe_router_pre_softmax


@pytest.mark.parametrize(
    "kwargs, layout, field",
    [
        ({"decoder_sparse_step": 2}, {}, "decoder_sparse_step"),
        ({"mlp_only_layers": [0]}, {}, "mlp_only_layers"),
        ({"use_sliding_window": True, "sliding_window": 16}, {}, "use_sliding_window"),
        ({}, {"ep_size": 3}, "expert_model_parallel_size=3 must divide num_experts=8"),
        ({}, {"ep_size": 2, "etp_size": 3}, "expert_tensor_parallel_size=3 must divide moe_intermediate_size=32"),
        ({}, {"routing_replay": True, "dense": True}, "routing_replay=rollout needs a MoE model"),
        ({}, {"ep_size": 2, "dense": True}, "expert_model_parallel_size=2 needs a MoE model"),
    ],
)
def test_unrepresentable_moe_configs_name_the_field(kwargs, layout, field):
    hf_config = _qwen() if layout.pop("dense", False) else _qwen3_moe(**kwargs)
    with pytest.raises(ValueError, match=re.escape(field)):
        transformer_config_from_hf(hf_config, 1, 1, **layout)


def test_moe_layouts_megatron_cannot_train_here_are_refused():
    with pytest.raises(ValueError, match="needs parallel.sequence_parallel=true"):
        transformer_config_from_hf(_qwen3_moe(), 2, 1)
    with pytest.raises(ValueError, match="on CPU set parallel.expert_tensor_parallel_size=1"):
        transformer_config_from_hf(_qwen3_moe(), 2, 1, sequence_parallel=True, ep_size=2)
