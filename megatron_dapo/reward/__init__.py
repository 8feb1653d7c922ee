"""Rewards: the DAPO math rule, and scoring with any ``reward.function`` inline or in worker processes."""

from megatron_dapo.reward.math_reward import Score, compute_score, extract_answer, normalize_integer
from megatron_dapo.reward.scoring import DEFAULT_REWARD_FUNCTION, RewardScorer, load_reward_function

__all__ = [
    "DEFAULT_REWARD_FUNCTION",
    "RewardScorer",
    "Score",
    "compute_score",
    "extract_answer",
    "load_reward_function",
    "normalize_integer",
]
