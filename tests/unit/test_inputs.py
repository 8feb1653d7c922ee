"""Prompt lengths against data.max_prompt_length and the model's positions, checked before any work starts."""

import pytest

from megatron_dapo.config import load_config
from megatron_dapo.data import PromptRecord
from megatron_dapo.errors import ConfigError
from megatron_dapo.inputs import check_model_fits_layout, fit_prompts
from megatron_dapo.toy import build_toy_tokenizer

# the toy model: a character tokenizer (one token per character) and max_position_embeddings=256
SHORT = PromptRecord([{"role": "user", "content": "1+2"}], "3", "toy")
LONG = PromptRecord([{"role": "user", "content": "1+" * 60 + "1"}], "61", "toy")  # 121 characters


def _config(*overrides):
    return load_config(None, ["rollout.max_response_length=16", *overrides])


def test_prompt_and_response_beyond_the_models_positions_are_refused():
    check_model_fits_layout(_config("data.max_prompt_length=240"))  # 240 + 16 = 256 fits
    with pytest.raises(ConfigError) as refused:
        check_model_fits_layout(_config("data.max_prompt_length=241"))
    assert str(refused.value) == ("data.max_prompt_length=241 + rollout.max_response_length=16 = 257 tokens exceeds "
                                  "max_position_embeddings=256 of the model; lower either")


def test_long_prompts_are_refused_or_dropped_and_counted(capsys):
    tokenizer = build_toy_tokenizer()
    records = [SHORT, LONG, SHORT]
    with pytest.raises(ConfigError, match=r"data.train_files: prompt 1 \('1\+1\+1.*has 1\d\d tokens > "
                       r"data.max_prompt_length=100; raise it or set data.overlong_prompt=drop"):
        fit_prompts(records, tokenizer, _config("data.max_prompt_length=100"), 256, "data.train_files")
    kept, dropped = fit_prompts(records, tokenizer, _config("data.max_prompt_length=100", "data.overlong_prompt=drop"),
                                256, "data.train_files")
    assert (kept, dropped) == ([SHORT, SHORT], 1)
    assert "data: data.train_files: dropped 1 of 3 prompts longer than data.max_prompt_length=100" in capsys.readouterr().out
    assert fit_prompts(records, tokenizer, _config("data.max_prompt_length=200"), 256, "x") == (records, 0)
    with pytest.raises(ConfigError, match="x: all 1 prompts are longer than data.max_prompt_length=100; raise it"):
        fit_prompts([LONG], tokenizer, _config("data.max_prompt_length=100", "data.overlong_prompt=drop"), 256, "x")


def test_without_a_limit_the_longest_prompt_must_leave_room_for_a_response():
    tokenizer = build_toy_tokenizer()
    assert fit_prompts([SHORT, LONG], tokenizer, _config(), 256, "data.val_files") == ([SHORT, LONG], 0)
    with pytest.raises(ConfigError, match=r"data.val_files: prompt 1 .* \+ rollout.max_response_length=16 exceeds "
                       r"max_position_embeddings=130: set data.max_prompt_length"):
        fit_prompts([SHORT, LONG], tokenizer, _config(), 130, "data.val_files")


def test_a_token_budget_below_the_longest_prompt_plus_one_is_refused_naming_the_prompt():
    tokenizer = build_toy_tokenizer()
    assert fit_prompts([SHORT, LONG], tokenizer, _config("parallel.max_tokens_per_micro_batch=200"), 256, "x")[1] == 0
    with pytest.raises(ConfigError, match=r"x: prompt 1 .* has 1\d\d tokens; parallel.max_tokens_per_micro_batch=100 "
                       r"must be at least the longest prompt \+ 1"):
        fit_prompts([SHORT, LONG], tokenizer, _config("parallel.max_tokens_per_micro_batch=100"), 256, "x")
