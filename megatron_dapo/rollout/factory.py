"""Which rollout engine a run uses, which ranks it spans, and building this rank's part of it."""

from __future__ import annotations

import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from megatron_dapo.config import RolloutConfig
from megatron_dapo.distributed import run_on_rank_zero
from megatron_dapo.errors import ConfigError
from megatron_dapo.rollout.base import RolloutEngine
from megatron_dapo.rollout.hf_engine import HFRolloutEngine


def engine_class(rollout: RolloutConfig) -> type[RolloutEngine]:
    """The engine class of ``rollout.engine`` (known on every rank, e.g. for its ``weight_dtype``)."""
    if rollout.engine == "sglang":
        from megatron_dapo.rollout.sglang_engine import SGLangRolloutEngine

        return SGLangRolloutEngine
    return HFRolloutEngine


def engine_ranks(rollout: RolloutConfig) -> list[int]:
    """The global ranks the engine spans; the first hosts it. Every one of them receives the weights.

    SGLang: ``rollout.sglang_tp_size`` GPUs (0: all of the first node's); the CPU engine: rank 0.
    """
    if rollout.engine == "sglang":
        size = rollout.sglang_tp_size or torch.cuda.device_count()
        if size > dist.get_world_size():
            raise ConfigError(f"rollout.sglang_tp_size={size} exceeds the job's {dist.get_world_size()} ranks")
        return list(range(size))
    return [0]


def build_rollout_engine(
    rollout: RolloutConfig, hf_dir: str, tokenizer: PreTrainedTokenizerBase, seed: int, weights_by_sync: bool
) -> RolloutEngine | None:
    """This rank's part of the engine (``None`` on ranks it does not span); collective.

    ``weights_by_sync``: the folder may hold only config and tokenizer; the weights arrive by the first sync
    (resume, ``model.megatron_checkpoint``). SGLang always starts that way (``load_format="dummy"``).
    """
    if rollout.engine == "sglang":
        if not torch.cuda.is_available():
            raise ConfigError("rollout.engine='sglang' needs CUDA GPUs; use rollout.engine=hf on CPU")
        from megatron_dapo.rollout.sglang_engine import SGLangRolloutEngine

        ranks = engine_ranks(rollout)
        group = dist.new_group(ranks)  # every rank takes part in creating a group
        if dist.get_rank() not in ranks:
            return None
        return SGLangRolloutEngine.launch(
            hf_dir, ranks, group, rollout.sglang_mem_fraction, seed, stop_token_ids=[tokenizer.eos_token_id]
        )
    build = HFRolloutEngine.from_config if weights_by_sync else HFRolloutEngine.from_pretrained
    return run_on_rank_zero(
        lambda: build(hf_dir, tokenizer.pad_token_id, tokenizer.eos_token_id, seed), share_result=False
    )
