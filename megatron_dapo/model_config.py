"""What a Hugging Face Qwen2/Llama config implies about the Megatron model built from it.

One place for the facts that the actor (building the model) and the weight code (mapping, checkpoints,
converters) both rely on: the padded vocabulary, the RoPE base, the QKV-bias rule, the head size, which
configs can be represented under a parallel layout, and when two configs describe the same model.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig

from megatron_dapo.errors import ConfigError, different_models

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int, tp_size: int) -> int:
    """Megatron's padded vocabulary: the next multiple of ``make_vocab_size_divisible_by * tp_size``."""
    multiple = make_vocab_size_divisible_by * tp_size
    return ((vocab_size + multiple - 1) // multiple) * multiple


def rope_theta(hf_config: PretrainedConfig) -> float:
    """RoPE base (``rope_theta``, or ``rope_parameters['rope_theta']`` in transformers 5); Megatron's default
    10000 would silently give wrong log-probs for Qwen2.5 (1e6), so a missing value is an error."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    if theta is None:
        raise ConfigError("model config has no 'rope_theta'; Qwen2.5 uses 1000000.0")
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 1:
        raise ConfigError(f"model config field 'rope_theta' is {theta!r}; it must be a number > 1 (Qwen2.5: 1000000.0)")
    return float(theta)


def has_qkv_bias(hf_config: PretrainedConfig) -> bool:
    """Qwen2 always has QKV biases; Llama only with ``attention_bias``."""
    return hf_config.model_type == "qwen2" or bool(getattr(hf_config, "attention_bias", False))


def head_dim(hf_config: PretrainedConfig) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


@dataclass(frozen=True)
class ModelLayout:
    """What the Megatron ⇄ HF layout transforms need to know about the model."""

    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool

    @classmethod
    def from_hf_config(cls, hf_config: PretrainedConfig) -> "ModelLayout":
        return cls(
            num_attention_heads=hf_config.num_attention_heads,
            num_key_value_heads=hf_config.num_key_value_heads,
            head_dim=head_dim(hf_config),
            vocab_size=hf_config.vocab_size,
            tie_word_embeddings=bool(hf_config.tie_word_embeddings),
        )


def validate_hf_config(hf_config: PretrainedConfig, tp_size: int = 1, pp_size: int = 1, vpp_size: int | None = None) -> None:
    """Refuse HF configs the actor cannot represent under this layout, naming the field and the fix."""
    if hf_config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"model config field 'model_type' is {hf_config.model_type!r}; supported: {SUPPORTED_MODEL_TYPES}")
    heads, groups = hf_config.num_attention_heads, hf_config.num_key_value_heads
    if heads % tp_size or groups % tp_size:
        raise ConfigError(
            f"parallel.tensor_model_parallel_size={tp_size} must divide num_attention_heads={heads} "
            f"and num_key_value_heads={groups} of the model config; choose a divisor of {groups}"
        )
    if hf_config.num_hidden_layers % (pp_size * (vpp_size or 1)):
        raise ConfigError(
            f"parallel.pipeline_model_parallel_size={pp_size} × parallel.virtual_pipeline_model_parallel_size="
            f"{vpp_size or 1} must divide num_hidden_layers={hf_config.num_hidden_layers} of the model config"
        )
    rope_theta(hf_config)  # present and plausible
    rope_type = (getattr(hf_config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type != "default":
        raise ConfigError(f"model config field 'rope_parameters.rope_type' is {rope_type!r}; only 'default' RoPE is supported")
    eps = hf_config.rms_norm_eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1e-2:
        raise ConfigError(f"model config field 'rms_norm_eps' is {eps!r}; expected a small positive number (Qwen2.5-32B: 1e-05)")


IDENTITY_FIELDS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings",
)


def model_identity(hf_config: PretrainedConfig) -> dict[str, object]:
    """The fields that must agree between a config and the weights or checkpoint it is used with."""
    identity = {name: getattr(hf_config, name, None) for name in IDENTITY_FIELDS}
    identity["rope_theta"] = rope_theta(hf_config)
    return identity


def check_same_model(expected: PretrainedConfig, saved: PretrainedConfig, source: str) -> None:
    """Refuse ``saved`` (the config stored with a checkpoint) unless it describes the ``expected`` model."""
    want, have = model_identity(expected), model_identity(saved)
    for name, value in want.items():
        if have[name] != value:
            raise different_models(f"model config field {name!r} is {value!r} but {source} was saved with {name}={have[name]!r}")
