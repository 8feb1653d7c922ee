"""What a Hugging Face Qwen2/Llama/Qwen3/Qwen3-MoE config implies about the Megatron model built from it.

One place for the facts that the actor (building the model) and the weight code (mapping, checkpoints,
converters) both rely on: the padded vocabulary, the RoPE base, the QKV-bias and q/k-norm rules, the head
size, the experts, which configs can be represented under a parallel layout, and when two configs describe
the same model.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig

from megatron_dapo.errors import ConfigError, different_models

SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "qwen3", "qwen3_moe")
QK_NORM_MODEL_TYPES = ("qwen3", "qwen3_moe")


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
    """Qwen2 always has QKV biases; Llama and Qwen3 only with ``attention_bias``."""
    return hf_config.model_type == "qwen2" or bool(getattr(hf_config, "attention_bias", False))


def has_qk_norm(hf_config: PretrainedConfig) -> bool:
    """Qwen3 normalises each head's queries and keys (RMSNorm over ``head_dim``) before RoPE."""
    return hf_config.model_type in QK_NORM_MODEL_TYPES


def head_dim(hf_config: PretrainedConfig) -> int:
    """Qwen3 states it (128 for every size, not hidden / heads); older configs imply it."""
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def num_experts(hf_config: PretrainedConfig) -> int:
    """Routed experts per layer; 0 for a dense model."""
    return int(getattr(hf_config, "num_experts", 0) or 0) if hf_config.model_type == "qwen3_moe" else 0


@dataclass(frozen=True)
class ModelLayout:
    """What the Megatron ⇄ HF layout transforms need to know about the model."""

    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    num_experts: int = 0

    @classmethod
    def from_hf_config(cls, hf_config: PretrainedConfig) -> "ModelLayout":
        return cls(
            num_attention_heads=hf_config.num_attention_heads,
            num_key_value_heads=hf_config.num_key_value_heads,
            head_dim=head_dim(hf_config),
            vocab_size=hf_config.vocab_size,
            tie_word_embeddings=bool(hf_config.tie_word_embeddings),
            num_experts=num_experts(hf_config),
        )


def _refuse_unrepresentable_fields(hf_config: PretrainedConfig) -> None:
    """Fields of Qwen3/Qwen3-MoE configs that the Megatron model built here would silently ignore."""
    if getattr(hf_config, "use_sliding_window", False):
        raise ConfigError("model config field 'use_sliding_window' is true; sliding-window attention is not supported")
    if hf_config.model_type != "qwen3_moe":
        return
    if getattr(hf_config, "decoder_sparse_step", 1) != 1:
        raise ConfigError(
            f"model config field 'decoder_sparse_step' is {hf_config.decoder_sparse_step}; only 1 (every layer MoE) "
            "is supported"
        )
    if getattr(hf_config, "mlp_only_layers", None):
        raise ConfigError(
            f"model config field 'mlp_only_layers' is {hf_config.mlp_only_layers}; dense layers in a MoE model are "
            "not supported (it must be empty)"
        )
    if getattr(hf_config, "shared_expert_intermediate_size", 0):
        raise ConfigError(
            f"model config field 'shared_expert_intermediate_size' is {hf_config.shared_expert_intermediate_size}; "
            "shared experts are not supported"
        )
    if not 0 < hf_config.num_experts_per_tok <= hf_config.num_experts:
        raise ConfigError(
            f"model config field 'num_experts_per_tok' is {hf_config.num_experts_per_tok}; it must be in "
            f"[1, num_experts={hf_config.num_experts}]"
        )


def validate_hf_config(
    hf_config: PretrainedConfig,
    tp_size: int = 1,
    pp_size: int = 1,
    vpp_size: int | None = None,
    ep_size: int = 1,
    etp_size: int | None = None,
) -> None:
    """Refuse HF configs the actor cannot represent under this layout, naming the field and the fix
    (``etp_size`` None: expert tensor parallelism equals ``tp_size``, megatron's default)."""
    if hf_config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"model config field 'model_type' is {hf_config.model_type!r}; supported: {SUPPORTED_MODEL_TYPES}")
    _refuse_unrepresentable_fields(hf_config)
    experts = num_experts(hf_config)
    if ep_size > 1 and not experts:
        raise ConfigError(
            f"parallel.expert_model_parallel_size={ep_size} needs a MoE model; {hf_config.model_type!r} is dense: set it to 1"
        )
    if experts and experts % ep_size:
        raise ConfigError(
            f"parallel.expert_model_parallel_size={ep_size} must divide num_experts={experts} of the model config"
        )
    etp_size = etp_size or tp_size
    if experts and hf_config.moe_intermediate_size % etp_size:
        raise ConfigError(
            f"parallel.expert_tensor_parallel_size={etp_size} must divide moe_intermediate_size="
            f"{hf_config.moe_intermediate_size} of the model config"
        )
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


def check_routing_replay(hf_config: PretrainedConfig, routing_replay: bool) -> None:
    """Routing replay replays experts: a dense model has none."""
    if routing_replay and not num_experts(hf_config):
        raise ConfigError(
            f"algorithm.routing_replay=rollout needs a MoE model; {hf_config.model_type!r} is dense: set it to off"
        )


IDENTITY_FIELDS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings",
)
MOE_IDENTITY_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob")


def model_identity(hf_config: PretrainedConfig) -> dict[str, object]:
    """The fields that must agree between a config and the weights or checkpoint it is used with."""
    identity = {name: getattr(hf_config, name, None) for name in IDENTITY_FIELDS}
    identity["rope_theta"] = rope_theta(hf_config)
    identity["head_dim"] = head_dim(hf_config)
    identity.update({name: getattr(hf_config, name, None) for name in MOE_IDENTITY_FIELDS if num_experts(hf_config)})
    return identity


def check_same_model(expected: PretrainedConfig, saved: PretrainedConfig, source: str) -> None:
    """Refuse ``saved`` (the config stored with a checkpoint) unless it describes the ``expected`` model."""
    want, have = model_identity(expected), model_identity(saved)
    for name, value in want.items():
        if have.get(name) != value:
            raise different_models(f"model config field {name!r} is {value!r} but {source} was saved with {name}={have.get(name)!r}")
