"""Layer spec choice: megatron-core's local spec on CPU, Transformer Engine's on GPU (same code above it)."""

import sys

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


BROKEN_TE_INIT = '''
# Stand-in for transformer-engine 2.11.0's top-level __init__, which swallows its PyTorch side's ImportError.
try:
    from . import pytorch
except ImportError:
    pass
'''


def test_transformer_engine_whose_torch_extension_fails_to_load_is_not_used(tmp_path, monkeypatch, capsys):
    """A TE built against another torch: ``import transformer_engine`` works, ``transformer_engine.pytorch`` does not.
    The GPU spec must not be chosen, and the reason is said (a fake TE package on a pretend CUDA host)."""
    from megatron_dapo.actor import model

    package = tmp_path / "transformer_engine"
    (package / "pytorch").mkdir(parents=True)
    (package / "__init__.py").write_text(BROKEN_TE_INIT)
    (package / "pytorch" / "__init__.py").write_text(
        "raise ImportError('transformer_engine_torch.so: undefined symbol: _ZN3c104cuda9SetDeviceEi')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("transformer_engine", "transformer_engine.pytorch"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    model.transformer_engine_unavailable_reason.cache_clear()
    try:
        import transformer_engine  # noqa: F401  (the trap: this import succeeds)

        assert not model.transformer_engine_available()
        assert "undefined symbol" in model.transformer_engine_unavailable_reason()
        assert "Transformer Engine is not usable" in capsys.readouterr().err
    finally:
        model.transformer_engine_unavailable_reason.cache_clear()
        for name in ("transformer_engine", "transformer_engine.pytorch"):
            sys.modules.pop(name, None)
