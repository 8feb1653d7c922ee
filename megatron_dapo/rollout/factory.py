"""Which rollout engine a run uses, and building it on the rank that hosts it."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from megatron_dapo.config import RolloutConfig
from megatron_dapo.errors import ConfigError
from megatron_dapo.rollout.base import RolloutEngine
from megatron_dapo.rollout.hf_engine import HFRolloutEngine


def engine_class(rollout: RolloutConfig) -> type[RolloutEngine]:
    """The engine class of ``rollout.engine`` (known on every rank, e.g. for its ``weight_dtype``)."""
    if rollout.engine == "sglang":
        from megatron_dapo.rollout.sglang_engine import SGLangRolloutEngine

        return SGLangRolloutEngine
    return HFRolloutEngine


def build_rollout_engine(
    rollout: RolloutConfig, hf_dir: str, tokenizer: PreTrainedTokenizerBase, seed: int, weights_by_sync: bool
) -> RolloutEngine:
    """The engine for this process. ``weights_by_sync``: the folder may hold only config and tokenizer; the
    weights arrive by the first sync (resume, ``model.megatron_checkpoint``)."""
    if rollout.engine == "sglang":
        if not torch.cuda.is_available():
            raise ConfigError("rollout.engine='sglang' needs CUDA GPUs; use rollout.engine=hf on CPU")
        from megatron_dapo.rollout.sglang_engine import SGLangRolloutEngine

        tp_size = rollout.sglang_tp_size or torch.cuda.device_count()
        return SGLangRolloutEngine.launch(hf_dir, tp_size, rollout.sglang_mem_fraction, seed)
    build = HFRolloutEngine.from_config if weights_by_sync else HFRolloutEngine.from_pretrained
    return build(hf_dir, tokenizer.pad_token_id, tokenizer.eos_token_id, seed)
