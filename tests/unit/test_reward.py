"""The DAPO-Math reward on tricky strings."""

import time

import pytest

from megatron_dapo.reward import compute_score, extract_answer, normalize_integer


@pytest.mark.parametrize(
    "response, ground_truth, acc",
    [
        ("So the total is 19.\nAnswer: 19", "19", True),
        ("Answer: 19.", "19", True),
        ("Answer:  019 ", "19", True),
        ("Answer: 19.0", "19", True),
        ("Answer: $19$", "19", True),
        ("Answer: \\boxed{19}", "19", True),
        ("answer: 19", "19", True),
        ("Answer: 1,000", "1000", True),
        ("Answer: -7", "-7", True),
        ("Answer: 18", "19", False),
        ("Answer: 19.5", "19", False),
        ("The result is \\boxed{42}", "42", True),
        ("\\boxed{\\frac{84}{2}}", "42", True),  # non-integer form: math-verify
        ("Answer: 12\nwait, recheck.\nAnswer: 13", "13", True),  # last Answer line wins
        ("\\boxed{5} ... Answer: 6", "6", True),  # Answer: before \boxed
        ("Answer: \\frac{1}{2}", "0.5", True),
        ("Answer: \\frac{1}{2}", "\\frac{2}{4}", True),
        ("I don't know", "3", False),
        ("", "3", False),
    ],
)
def test_scores(response, ground_truth, acc):
    result = compute_score(response, ground_truth)
    assert result["acc"] is acc
    assert result["score"] == (1.0 if acc else -1.0)


def test_only_the_tail_is_read():
    response = "Answer: 7\n" + "x" * 400
    assert extract_answer(response) is None
    assert compute_score(response, "7")["score"] == -1.0


def test_pred_is_reported():
    assert compute_score("Answer: 019", "19")["pred"] == "019"
    assert compute_score("nothing here", "19")["pred"] is None


@pytest.mark.parametrize("text, value", [("19", 19), ("19.", 19), (" 019 ", 19), ("19.0", 19), ("1,000", 1000), ("1,00", None), ("x", None)])
def test_normalize_integer(text, value):
    assert normalize_integer(text) == value


def test_pathological_inputs_are_bounded():
    adversarial = [
        "x" * 10_000_000 + "Answer: 5",  # huge
        "Answer: " + "{" * 150 + "1" + "}" * 150,  # deep nesting
        "Answer: " + "\\frac{1}{" * 35 + "2" + "}" * 35,
        "Answer: 9^{9^{9^{9^{9^{9}}}}}",
        "\\boxed{" * 100,  # unbalanced
    ]
    for response in adversarial:
        start = time.monotonic()
        result = compute_score(response, "\\frac{1}{3}")
        assert time.monotonic() - start < 15
        assert result["score"] in (-1.0, 1.0)


@pytest.mark.parametrize(
    "answer, value",
    [("100 dollars", 100), ("100 dollars.", 100), ("5 \\text{ points}", 5), ("90^\\circ", 90), ("50\\%", 50),
     ("12 cm", 12), ("1,000 apples", 1000), ("3 ways", 3), ("2 pi", None), ("3 x", None), ("7 sqrt", None), ("5x", None)],
)
def test_integers_followed_by_unit_words(answer, value):
    """As the reference recipe's normaliser does; math-verify would read the word as a product of symbols."""
    assert normalize_integer(answer) == value
    assert compute_score(f"so\nAnswer: {answer}", "100" if value is None else str(value))["acc"] is (value is not None)


def _scaled_reward(response, ground_truth, data_source="", **_):
    """A custom reward (module:function contract): the answer's length, with a row field."""
    return {"score": float(len(response)) if data_source == "custom" else -1.0, "acc": response == ground_truth}


def test_pluggable_reward_function_gets_the_row_fields_inline_and_in_workers():
    from megatron_dapo.reward import RewardScorer

    items = [("42", "42", {"data_source": "custom"}), ("7", "42", {"data_source": "custom"}), ("x", "x", {})]
    expected = [(2.0, True), (1.0, False), (-1.0, True)]
    for workers in (0, 2):
        scorer = RewardScorer(f"{__name__}:_scaled_reward", num_workers=workers)
        scores = scorer.score(items)
        scorer.close()
        assert [(s["score"], s["acc"]) for s in scores] == expected


def test_default_reward_in_worker_processes_equals_inline():
    from megatron_dapo.reward import RewardScorer

    items = [("Answer: 19", "19", {}), ("Answer: 18", "19", {}), ("\\boxed{\\frac{84}{2}}", "42", {}), ("no", "3", {})]
    pool = RewardScorer(num_workers=2)
    assert pool.score(items) == RewardScorer().score(items)
    pool.close()


@pytest.mark.parametrize("spec, message", [("nomodule", "must look like"), ("json:nothing_here", "cannot be loaded"),
                                           ("json:__doc__", "not callable")])
def test_a_wrong_reward_function_names_the_key(spec, message):
    from megatron_dapo.errors import ConfigError
    from megatron_dapo.reward import RewardScorer

    with pytest.raises(ConfigError, match=f"reward.function=.*{message}"):
        RewardScorer(spec)
