"""Held-out evaluation metrics from per-problem correctness: avg@k and the unbiased pass@k, per data source.

Every problem has n = ``rollout.val_n`` samples. avg@k, the expected accuracy of k samples, is the same number
for every k; it is estimated from all n samples (DAPO's avg@32 is k = n). pass@k, the probability that at least
one of k samples is correct, uses the unbiased estimator over the n samples (Chen et al. 2021; docs/pitfalls.md,
18), with a sample counted correct when its ``acc`` is positive.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb

UNNAMED_SOURCE = "unknown"  # the data source of rows without a data_source field


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k estimator ``1 − C(n−c, k) / C(n, k)`` (docs/pitfalls.md, 18)."""
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - comb(num_samples - num_correct, k) / comb(num_samples, k)


def avg_at_k(correct: list[list[float]]) -> float:
    """avg@k: the mean correctness of each problem's samples, averaged over problems."""
    return sum(sum(samples) / len(samples) for samples in correct) / len(correct)


def mean_pass_at_k(correct: list[list[float]], k: int) -> float:
    """pass@k of each problem from all its samples, averaged over problems."""
    return sum(pass_at_k(len(samples), sum(a > 0 for a in samples), k) for samples in correct) / len(correct)


def eval_ks(num_samples: int) -> list[int]:
    """The k reported: 1, 2, 4, … up to n, and n itself when it is not a power of two (avg@32 and pass@32 for
    DAPO's n = 32; 1, 2, 4, 6 for n = 6)."""
    ks = [1 << i for i in range(num_samples.bit_length())]
    return ks if ks[-1] == num_samples else [*ks, num_samples]


@dataclass(frozen=True)
class EvalSummary:
    """One evaluation: ``eval/<data_source>/avg@k`` and ``eval/<data_source>/pass@k`` for every k of
    ``eval_ks(n)``, and avg@n and pass@n over all problems (what the CLI's last line reports)."""

    metrics: dict[str, float]
    num_samples: int
    avg: float
    pass_at_n: float


def summarize(correct: list[list[float]], sources: list[str]) -> EvalSummary:
    """The metrics of problems with these samples' correctness (``correct[i]``: problem i's n samples) and these
    data sources, sources in order of first appearance."""
    n = min(map(len, correct))
    by_source: dict[str, list[list[float]]] = {}
    for source, samples in zip(sources, correct, strict=True):
        by_source.setdefault(source or UNNAMED_SOURCE, []).append(samples)
    metrics = {}
    for source, problems in by_source.items():
        avg = avg_at_k(problems)
        for k in eval_ks(n):
            metrics[f"eval/{source}/avg@{k}"] = avg
            metrics[f"eval/{source}/pass@{k}"] = mean_pass_at_k(problems, k)
    return EvalSummary(metrics, n, avg_at_k(correct), mean_pass_at_k(correct, n))
