"""Which HF config fields make two models the same model, and the check that refuses a mismatch."""

from __future__ import annotations

from transformers import PretrainedConfig

from megatron_dapo.actor.model import rope_theta
from megatron_dapo.weights.hf_mapping import CheckpointMismatchError

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
    for field, value in want.items():
        if have[field] != value:
            raise CheckpointMismatchError(
                f"model config field {field!r} is {value!r} but {source} was saved with {field}={have[field]!r}: "
                "the config and the checkpoint belong to different models"
            )
