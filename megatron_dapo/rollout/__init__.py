"""Rollout engines behind one interface, and the generation rounds that turn prompts into scored groups."""

from megatron_dapo.rollout.base import RolloutEngine
from megatron_dapo.rollout.hf_engine import HFRolloutEngine

__all__ = ["HFRolloutEngine", "RolloutEngine"]
