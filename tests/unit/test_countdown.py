"""The countdown task: problems, the teacher's demonstrations (scored by the real reward function), lengths."""

import random
import re

import pytest

from megatron_dapo.config import ToyModelConfig
from megatron_dapo.data import load_prompt_file, make_toy_rows, validate_row, write_toy_dataset
from megatron_dapo.reward.math_reward import compute_score
from megatron_dapo.toy import build_toy_tokenizer
from megatron_dapo.toy.toy_model import LOOP_LENGTH, _demonstration

CLEAN = ToyModelConfig(sft_step_error=0.0, sft_ramble=0.0, sft_loop=0.0)
TOKENIZER = build_toy_tokenizer()


def _records(tmp_path, num=300, seed=5):
    return load_prompt_file(write_toy_dataset(tmp_path / "countdown.parquet", num, seed, task="countdown"))


def _text(record, cfg, rng):
    return TOKENIZER.decode(_demonstration(record, cfg, TOKENIZER, rng), skip_special_tokens=True)


def test_problems_and_answers(tmp_path):
    starts, steps = set(), set()
    for record in _records(tmp_path):
        match = re.fullmatch(r"Count down from (\d+) by (\d)\.", record.messages[0]["content"])
        assert match and record.data_source == "toy-countdown", record.messages
        start, step = int(match.group(1)), int(match.group(2))
        remaining = start
        while remaining >= step:  # the countdown, done by hand
            remaining -= step
        assert int(record.ground_truth) == remaining
        starts.add(start), steps.add(step)
    assert min(starts) == 10 and max(starts) == 99 and steps == set(range(3, 10))


def test_the_arithmetic_task_is_unchanged():
    """The default task's problems are those it always was (seed 0's first three, recorded before the
    countdown task existed)."""
    rows = make_toy_rows(3, seed=0)
    assert [row["prompt"][0]["content"] for row in rows] == ["24+48=", "26+2=", "16+32="]
    assert rows[0]["data_source"] == "toy-arithmetic"


def test_a_clean_demonstration_is_the_worked_countdown_and_scores_correct():
    record = validate_row({"data_source": "toy-countdown", "reward_model": {"ground_truth": "5"},
                           "prompt": [{"role": "user", "content": "Count down from 47 by 6."}]}, "f", 0)
    ids = _demonstration(record, CLEAN, TOKENIZER, random.Random(0))
    assert ids[-1] == TOKENIZER.eos_token_id
    text = TOKENIZER.decode(ids, skip_special_tokens=True)
    assert text == "47 41 35 29 23 17 11 5 Answer: 5"
    assert compute_score(text, "5")["acc"]


def test_demonstration_noise_wrong_steps_rambling_and_loops(tmp_path):
    records = _records(tmp_path)
    rng = random.Random(1)
    clean = [_text(r, CLEAN, rng) for r in records]
    assert all(compute_score(text, r.ground_truth)["acc"] for text, r in zip(clean, records))
    lengths = [len(TOKENIZER.encode(text)) + 1 for text in clean]
    assert 14 <= min(lengths) <= 20 and 90 <= max(lengths) <= 112  # below max_response_length − buffer (112)
    wrong = [_text(r, ToyModelConfig(sft_step_error=1.0, sft_ramble=0.0, sft_loop=0.0), rng) for r in records]
    # every number off by 1–2, carried on: the answer is rarely still right
    assert sum(compute_score(text, r.ground_truth)["acc"] for text, r in zip(wrong, records)) < 0.3 * len(records)
    rambling = ToyModelConfig(sft_step_error=0.0, sft_ramble=1.0, sft_loop=0.0)
    for record, text in zip(records[:20], clean):
        rambled = _text(record, rambling, rng)
        assert compute_score(rambled, record.ground_truth)["acc"] and len(rambled.split()) >= len(text.split()) + 2
    lost = ToyModelConfig(sft_step_error=0.0, sft_ramble=1.0, sft_ramble_repeats=20, sft_ramble_error=1.0, sft_loop=0.0)
    lost_texts = [_text(r, lost, rng) for r in records]
    extra_words = [len(t.split()) - len(c.split()) for t, c in zip(lost_texts, clean)]
    assert min(extra_words) == 2 and max(extra_words) == 20  # repeats 2..20
    # the count is lost after the repeats unless the repeated number was the last one: mostly wrong
    wrong_share = 1 - sum(compute_score(t, r.ground_truth)["acc"] for t, r in zip(lost_texts, records)) / len(records)
    assert 0.75 < wrong_share < 1.0
    looping = ToyModelConfig(sft_step_error=0.0, sft_ramble=0.0, sft_loop=1.0)
    for record in records[:20]:
        ids = _demonstration(record, looping, TOKENIZER, rng)
        assert TOKENIZER.eos_token_id not in ids and len(ids) == LOOP_LENGTH
        assert not compute_score(TOKENIZER.decode(ids), record.ground_truth)["acc"]


def test_the_configured_share_of_looping_demonstrations(tmp_path):
    records = _records(tmp_path, num=1000)
    rng = random.Random(2)
    cfg = ToyModelConfig(sft_step_error=0.0, sft_ramble=0.2, sft_loop=0.1)
    ids = [_demonstration(r, cfg, TOKENIZER, rng) for r in records]
    assert sum(TOKENIZER.eos_token_id not in x for x in ids) / len(ids) == pytest.approx(0.1, abs=0.03)


def test_a_saved_toy_tokenizer_loads_back_as_it_was(tmp_path):
    """transformers' AutoTokenizer would rebuild a Qwen2 folder's pre-tokenizer and drop the spaces of
    ``Count down from 98 by 6.``: the run's tokenizer must encode prompts as the warm start did."""
    from transformers import Qwen2ForCausalLM

    from megatron_dapo.inputs import load_tokenizer
    from megatron_dapo.toy import toy_hf_config

    Qwen2ForCausalLM(toy_hf_config(ToyModelConfig(hidden_size=32, intermediate_size=64), TOKENIZER)).save_pretrained(tmp_path)
    TOKENIZER.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    for text in ("Count down from 98 by 6.", "98 92 86 Answer: 2", "24+48="):
        assert loaded.encode(text) == TOKENIZER.encode(text) == [TOKENIZER.convert_tokens_to_ids(c) for c in text]
    assert loaded.decode(TOKENIZER.encode("98 92 Answer: 2")) == "98 92 Answer: 2"
    assert loaded.eos_token_id == TOKENIZER.eos_token_id and loaded.pad_token_id == TOKENIZER.pad_token_id
    messages = [{"role": "user", "content": "Count down from 98 by 6."}]
    assert loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == "Count down from 98 by 6."
