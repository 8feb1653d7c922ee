"""Layer spec choice: megatron-core's local spec on CPU, Transformer Engine's on GPU (same code above it)."""

import pytest
import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_dapo.actor.model import SequenceParallelRMSNorm, layer_spec, transformer_engine_available

CONFIG = TransformerConfig(num_layers=2, hidden_size=8, num_attention_heads=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU host behaviour")
def test_cpu_uses_local_spec():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    assert not transformer_engine_available()
    spec = layer_spec(CONFIG)
    assert spec.submodules.self_attention.submodules.core_attention is DotProductAttention


def test_sequence_parallel_norm_is_tagged_for_the_tp_gradient_all_reduce():
    import dataclasses

    config = dataclasses.replace(CONFIG, tensor_model_parallel_size=2, sequence_parallel=True)
    assert SequenceParallelRMSNorm(config, 8).weight.sequence_parallel is True
    assert SequenceParallelRMSNorm(CONFIG, 8).weight.sequence_parallel is False


@pytest.mark.gpu
def test_gpu_uses_transformer_engine_spec():
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    assert transformer_engine_available()
    assert layer_spec(CONFIG).submodules.self_attention.submodules.core_attention is TEDotProductAttention
