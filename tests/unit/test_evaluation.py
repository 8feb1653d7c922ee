"""Evaluation metrics: pass@k against brute-force enumeration of k-subsets, the reported k, per-source metrics
against hand-computed numbers, and the metrics log's step-0 row across a fresh run and a resume."""

import json
from itertools import combinations

import pytest

from megatron_dapo.evaluation import eval_ks, mean_pass_at_k, pass_at_k, summarize
from megatron_dapo.metrics import MetricsLogger


def _brute_force_pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """The share of the k-subsets of n samples (the first c correct) that hold at least one correct sample."""
    subsets = list(combinations(range(num_samples), k))
    return sum(any(i < num_correct for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("num_samples", [1, 2, 3, 5, 8])
def test_pass_at_k_is_the_share_of_k_subsets_with_a_correct_sample(num_samples):
    for num_correct in range(num_samples + 1):
        for k in range(1, num_samples + 1):
            expected = _brute_force_pass_at_k(num_samples, num_correct, k)
            assert pass_at_k(num_samples, num_correct, k) == pytest.approx(expected, abs=1e-12), (num_correct, k)


def test_reported_k_are_powers_of_two_and_n():
    assert eval_ks(1) == [1]
    assert eval_ks(2) == [1, 2]
    assert eval_ks(3) == [1, 2, 3]
    assert eval_ks(6) == [1, 2, 4, 6]
    assert eval_ks(32) == [1, 2, 4, 8, 16, 32]


def test_metrics_per_data_source_hand_computed():
    correct = [[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0]]
    summary = summarize(correct, ["aime", "math", "aime", ""])
    # aime: problems with 1 and 0 of 4 correct. pass@2 of one correct in four: 1 − C(3,2)/C(4,2) = 1/2
    assert summary.metrics == pytest.approx({
        "eval/aime/avg@1": 0.125, "eval/aime/pass@1": 0.125,
        "eval/aime/avg@2": 0.125, "eval/aime/pass@2": 0.25,
        "eval/aime/avg@4": 0.125, "eval/aime/pass@4": 0.5,
        "eval/math/avg@1": 1.0, "eval/math/pass@1": 1.0, "eval/math/avg@2": 1.0, "eval/math/pass@2": 1.0,
        "eval/math/avg@4": 1.0, "eval/math/pass@4": 1.0,
        # two of four correct: pass@2 = 1 − C(2,2)/C(4,2) = 5/6; rows without a data_source: "unknown"
        "eval/unknown/avg@1": 0.5, "eval/unknown/pass@1": 0.5, "eval/unknown/avg@2": 0.5,
        "eval/unknown/pass@2": 5 / 6, "eval/unknown/avg@4": 0.5, "eval/unknown/pass@4": 1.0,
    })
    assert list(summary.metrics)[:2] == ["eval/aime/avg@1", "eval/aime/pass@1"]  # sources in order of appearance
    assert summary.num_samples == 4
    assert summary.avg == pytest.approx((0.25 + 1 + 0 + 0.5) / 4)
    assert summary.pass_at_n == pytest.approx(3 / 4)
    assert mean_pass_at_k(correct, 1) == pytest.approx(summary.avg)  # pass@1 is the mean accuracy


def _steps(out) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_resumed_run_keeps_the_evaluation_before_training_and_a_fresh_run_drops_it(tmp_path):
    first = MetricsLogger(tmp_path, tensorboard=False)
    for step in (0, 1, 2, 3):
        first.log(step, {"eval/toy/avg@1": 0.5})
    assert _steps(tmp_path) == [0, 1, 2, 3]
    MetricsLogger(tmp_path, tensorboard=False, resumed_after=2).log(3, {"acc/mean": 1.0})
    assert _steps(tmp_path) == [0, 1, 2, 3]  # step 3 once: the resumed run's
    MetricsLogger(tmp_path, tensorboard=False).log(0, {"eval/toy/avg@1": 0.25})
    assert _steps(tmp_path) == [0]  # a fresh run in the same folder: its own step 0 only
