"""Held-out evaluation metrics from per-problem correctness: avg@k and the unbiased pass@k."""

from __future__ import annotations

from math import comb


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k estimator ``1 − C(n−c, k) / C(n, k)`` (docs/pitfalls.md, 18)."""
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - comb(num_samples - num_correct, k) / comb(num_samples, k)


def avg_at_k(correct: list[list[float]]) -> float:
    """avg@k: the mean correctness of each problem's k samples, averaged over problems."""
    return sum(sum(samples) / len(samples) for samples in correct) / len(correct)
