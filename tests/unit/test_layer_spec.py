"""Layer spec choice: megatron-core's local spec on CPU, Transformer Engine's on GPU (same code above it)."""

import pytest
import torch

from megatron_dapo.actor.model import layer_spec, transformer_engine_available


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU host behaviour")
def test_cpu_uses_local_spec():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    assert not transformer_engine_available()
    spec = layer_spec()
    assert spec.submodules.self_attention.submodules.core_attention is DotProductAttention


@pytest.mark.gpu
def test_gpu_uses_transformer_engine_spec():
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    assert transformer_engine_available()
    assert layer_spec().submodules.self_attention.submodules.core_attention is TEDotProductAttention
