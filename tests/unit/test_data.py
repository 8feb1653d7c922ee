"""Data loading, validation errors naming file/row/field, the resumable sampler, the toy task."""

import json

import pytest

from megatron_dapo.data import DatasetFormatError, PromptSampler, load_prompt_file, make_toy_rows, write_toy_dataset

GOOD = {
    "data_source": "math_dapo",
    "prompt": [{"role": "user", "content": "What is 1+1? Answer: $Answer"}],
    "ability": "MATH",
    "reward_model": {"style": "rule", "ground_truth": "2"},
    "extra_info": {"index": 0},
}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_toy_parquet_round_trip(tmp_path):
    path = write_toy_dataset(tmp_path / "toy.parquet", 20, seed=3)
    records = load_prompt_file(path)
    assert len(records) == 20
    a, b = records[0].messages[0]["content"].rstrip("=").split("+")
    assert int(records[0].ground_truth) == int(a) + int(b)


def test_jsonl_loads(tmp_path):
    records = load_prompt_file(_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD]))
    assert [r.ground_truth for r in records] == ["2", "2"]


def _one_line_error(path):
    with pytest.raises(DatasetFormatError) as info:
        load_prompt_file(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_ground_truth_names_file_row_field(tmp_path):
    bad = dict(GOOD, reward_model={"style": "rule"})
    path = _jsonl(tmp_path / "d.jsonl", [GOOD, bad])
    message = _one_line_error(path)
    assert str(path) in message and "row 1" in message and "reward_model.ground_truth" in message


def test_non_list_prompt_names_file_row_field(tmp_path):
    bad = dict(GOOD, prompt="What is 1+1?")
    path = _jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, bad])
    message = _one_line_error(path)
    assert str(path) in message and "row 2" in message and "'prompt'" in message


def test_non_list_prompt_in_parquet(tmp_path):
    import datasets

    path = tmp_path / "d.parquet"
    datasets.Dataset.from_list([dict(GOOD, prompt="plain text")]).to_parquet(str(path))
    message = _one_line_error(path)
    assert str(path) in message and "row 0" in message and "'prompt'" in message


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.parquet"])
def test_empty_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"")
    message = _one_line_error(path)
    assert str(path) in message and "empty" in message


def test_missing_file_and_bad_suffix(tmp_path):
    assert "not found" in _one_line_error(tmp_path / "nope.parquet")
    (tmp_path / "d.csv").write_text("a,b\n")
    assert "unsupported" in _one_line_error(tmp_path / "d.csv")


def test_sampler_covers_each_epoch_and_resumes_exactly():
    sampler = PromptSampler(10, seed=7)
    first = sampler.next_indices(10)
    assert sorted(first) == list(range(10))
    sampler.next_indices(3)
    state = sampler.state_dict()
    expected = sampler.next_indices(12)
    resumed = PromptSampler(10, seed=7)
    resumed.load_state_dict(state)
    assert resumed.next_indices(12) == expected
    with pytest.raises(ValueError, match="same data"):
        PromptSampler(11, seed=7).load_state_dict(state)


def test_given_back_prompts_come_first_and_survive_a_resume():
    sampler = PromptSampler(10, seed=7)
    drawn = sampler.next_indices(6)
    sampler.give_back(drawn[4:])  # drawn, not used
    state = sampler.state_dict()
    following = sampler.next_indices(5)
    assert following[:2] == drawn[4:] and following[2:] == PromptSampler(10, seed=7).next_indices(9)[6:]
    resumed = PromptSampler(10, seed=7)
    resumed.load_state_dict(state)
    assert resumed.next_indices(5) == following


def test_row_fields_reach_the_record():
    from megatron_dapo.data import validate_row

    row = {"prompt": [{"role": "user", "content": "1+1="}], "reward_model": {"ground_truth": "2"},
           "data_source": "aime", "extra_info": {"index": 3}}
    record = validate_row(row, "f", 0)
    assert record.extra == {"data_source": "aime", "extra_info": {"index": 3}}


def test_toy_rows_follow_schema():
    row = make_toy_rows(1, seed=0)[0]
    assert set(row) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    assert row["reward_model"]["style"] == "rule"
