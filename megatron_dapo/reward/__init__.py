"""Rule-based rewards."""

from megatron_dapo.reward.math_reward import compute_score, extract_answer, normalize_integer

__all__ = ["compute_score", "extract_answer", "normalize_integer"]
