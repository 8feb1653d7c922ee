"""Which rollout engines a run uses, where they sit, and building this rank's part of them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from megatron_dapo.config import RolloutConfig
from megatron_dapo.distributed import run_on_ranks
from megatron_dapo.errors import ConfigError
from megatron_dapo.rollout.base import RolloutEngine
from megatron_dapo.rollout.hf_engine import HFRolloutEngine


def engine_class(rollout: RolloutConfig) -> type[RolloutEngine]:
    """The engine class of ``rollout.engine`` (known on every rank, e.g. for its ``weight_dtype``)."""
    if rollout.engine == "sglang":
        from megatron_dapo.rollout.sglang_engine import SGLangRolloutEngine

        return SGLangRolloutEngine
    return HFRolloutEngine


@dataclass(frozen=True)
class EnginePlacement:
    """Engine ``e`` spans the global ranks ``[e·k, (e+1)·k)`` (``k = rollout.ranks_per_engine``, one node) and
    lives in the first of them, its host."""

    ranks_per_engine: int
    world_size: int

    @property
    def num_engines(self) -> int:
        return self.world_size // self.ranks_per_engine

    @property
    def hosts(self) -> list[int]:
        return [engine * self.ranks_per_engine for engine in range(self.num_engines)]

    def ranks(self, engine: int) -> list[int]:
        return list(range(engine * self.ranks_per_engine, (engine + 1) * self.ranks_per_engine))

    def engine_of(self, rank: int) -> int:
        return rank // self.ranks_per_engine

    def weight_receivers(self, rollout: RolloutConfig) -> list[int]:
        """Ranks the weight sync delivers to: every rank of an SGLang engine (each hands over its own GPU's
        copy), the host of a CPU engine."""
        return list(range(self.world_size)) if rollout.engine == "sglang" else self.hosts


def build_rollout_engine(
    rollout: RolloutConfig,
    placement: EnginePlacement,
    hf_dir: str,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    weights_by_sync: bool,
    timeout_minutes: int = 30,
    route_shape: tuple[int, int] | None = None,
) -> RolloutEngine | None:
    """This rank's part of its engine (``None`` on the CPU engine's other ranks); collective, and a failure on
    one rank ends every rank with its error.

    ``weights_by_sync``: the weights arrive by a sync (the trainer's, before its first generation), so nothing
    is read from the folder but its config and tokenizer (SGLang: ``load_format="dummy"``). Otherwise
    (``megatron-dapo eval``) the engine serves the folder's weights. ``timeout_minutes``
    (``trainer.distributed_timeout_minutes``): the engines' process groups', like the job's. ``route_shape``
    (``(MoE layers, top-k)``, routing replay): SGLang captures and returns every token's experts; the CPU
    engine returns them for any MoE model.
    """
    if rollout.engine == "sglang":
        if not torch.cuda.is_available():
            raise ConfigError("rollout.engine='sglang' needs CUDA GPUs; use rollout.engine=hf on CPU")
        from megatron_dapo.rollout.sglang_engine import SGLangRolloutEngine

        timeout = timedelta(minutes=timeout_minutes)  # new_group's default is the backend's, not the job's
        groups = [dist.new_group(placement.ranks(e), timeout=timeout)  # on every rank, in order
                  for e in range(placement.num_engines)]
        engine = placement.engine_of(dist.get_rank())
        ranks = placement.ranks(engine)
        return run_on_ranks(list(range(placement.world_size)), lambda: SGLangRolloutEngine.launch(
            hf_dir, ranks, groups[engine], rollout.sglang_mem_fraction, seed, [tokenizer.eos_token_id],
            rollout.sglang_deterministic, "dummy" if weights_by_sync else "auto",
            start_timeout_s=rollout.engine_start_timeout_s, idle_timeout_s=rollout.engine_idle_timeout_s,
            route_shape=route_shape,
        ))
    build = HFRolloutEngine.from_config if weights_by_sync else HFRolloutEngine.from_pretrained
    return run_on_ranks(placement.hosts, lambda: build(hf_dir, tokenizer.pad_token_id, tokenizer.eos_token_id))
