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


def _row(question, answer, source="math_dapo", system=None):
    prompt = [{"role": "user", "content": question}]
    if system is not None:
        prompt.insert(0, {"role": "system", "content": system})
    return {"data_source": source, "prompt": prompt, "reward_model": {"style": "rule", "ground_truth": answer}}


def test_repeated_rows_are_dropped_keeping_the_first_in_order(tmp_path):
    """Like the public AIME-2024 parquet: every problem repeated, here 3 problems 4 times, interleaved."""
    import datasets

    from megatron_dapo.data import find_duplicates

    problems = [_row("1+1=", "2"), _row("2+2=", "4"), _row("3+3=", "6")]
    path = tmp_path / "aime.parquet"
    datasets.Dataset.from_list([dict(p, extra_info={"index": i}) for i in range(4) for p in problems]).to_parquet(str(path))
    records = load_prompt_file(path)
    found = find_duplicates(records)
    assert len(records) == 12 and [r.messages[0]["content"] for r in found.unique] == ["1+1=", "2+2=", "3+3="]
    assert [r.extra["extra_info"]["index"] for r in found.unique] == [0, 0, 0]  # the first of each
    assert found.ambiguous_prompts == 0


def test_a_repeat_needs_the_same_messages_and_ground_truth(tmp_path):
    from megatron_dapo.data import find_duplicates

    rows = [
        _row("1+1=", "2"),
        _row("1+1=", "2", source="other"),  # other fields are not compared: a repeat
        _row("1+1=", "2", system="Think step by step."),  # other messages: another prompt
        _row("1+1=", "3"),  # same prompt, another answer: kept, counted as ambiguous
        _row("2+2=", "4"),
    ]
    found = find_duplicates(load_prompt_file(_jsonl(tmp_path / "d.jsonl", rows)))
    assert [(len(r.messages), r.ground_truth, r.data_source) for r in found.unique] == [
        (1, "2", "math_dapo"), (2, "2", "math_dapo"), (1, "3", "math_dapo"), (1, "4", "math_dapo")]
    assert found.ambiguous_prompts == 1


def test_loading_says_what_deduplication_did(tmp_path, capsys):
    from megatron_dapo.inputs import load_prompts

    path = str(_jsonl(tmp_path / "d.jsonl", [_row("1+1=", "2")] * 3 + [_row("2+2=", "4"), _row("2+2=", "5")]))
    assert [r.ground_truth for r in load_prompts([path], deduplicate=True)] == ["2", "4", "5"]
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"data: {path}: kept 3 of 5 rows (2 duplicates dropped; data.deduplicate=false keeps them)",
        f"data: warning: {path}: 1 prompt(s) with more than one ground truth; every row kept, each scored against "
        "its own answer",
    ]
    assert len(load_prompts([path], deduplicate=False)) == 5
    assert capsys.readouterr().out.splitlines()[0] == f"data: {path}: 5 rows, 2 of them duplicates, kept (data.deduplicate=false)"
