"""Rollout engines behind one interface."""

from megatron_dapo.rollout.base import RolloutEngine, RolloutSample
from megatron_dapo.rollout.hf_engine import HFRolloutEngine

__all__ = ["HFRolloutEngine", "RolloutEngine", "RolloutSample"]
