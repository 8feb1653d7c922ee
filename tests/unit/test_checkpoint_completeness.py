"""Issue 17.3: which saved checkpoints a resume may use (complete and readable), in which order, and which
``remove_old_checkpoints`` may delete. The checkpoints are hand-made torch_dist folders: torch's own writer
for ``.metadata`` and the shard, the files megatron-core and the trainer add, then damaged on purpose."""

from pathlib import Path

import pytest

from megatron_dapo.checkpointing import remove_old_checkpoints
from megatron_dapo.config import ConfigError, load_config
from megatron_dapo.weights.checkpoint_reader import saved_iterations

from ..helpers import write_torch_dist_checkpoint as _save


def _shard(folder: Path) -> Path:
    (shard,) = folder.glob("*.distcp")
    return shard


def _problems(save_dir: Path) -> dict[str, str | None]:
    return {folder.name: problem for folder, problem in saved_iterations(save_dir)}


def test_newest_first_with_why_each_torn_one_cannot_be_resumed(tmp_path):
    for step in (1, 9, 10, 11, 12):
        _save(tmp_path, step, finished=step != 12)
    whole = _shard(tmp_path / "iter_0000011").stat().st_size  # what torch wrote: the byte ranges end there
    with _shard(tmp_path / "iter_0000011").open("r+b") as shard:
        shard.truncate(100)
    (tmp_path / "iter_0000010" / ".metadata").unlink()
    (tmp_path / "iter_0000009" / "common.pt").unlink()
    problems = _problems(tmp_path)
    assert list(problems) == ["iter_0000012", "iter_0000011", "iter_0000010", "iter_0000009", "iter_0000001"]
    assert problems["iter_0000012"] == "its save did not finish"
    assert "truncated" in problems["iter_0000011"] and f"100 of {whole} bytes" in problems["iter_0000011"]
    assert problems["iter_0000010"] == ".metadata is missing"
    assert problems["iter_0000009"] == "common.pt is missing"
    assert problems["iter_0000001"] is None


def test_an_unreadable_metadata_file_and_a_missing_shard_are_named(tmp_path):
    (tmp_path / "iter_0000002").mkdir()
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    (tmp_path / "iter_0000001" / ".metadata").write_bytes(b"not a pickle")
    _shard(tmp_path / "iter_0000002").unlink()
    problems = _problems(tmp_path)
    assert problems["iter_0000001"].startswith(".metadata cannot be read")
    assert problems["iter_0000002"].startswith("shard ") and problems["iter_0000002"].endswith("is missing")


def test_a_save_named_by_the_tracker_counts_as_finished_without_the_marker(tmp_path):
    """Checkpoints written before the marker existed: the tracker, written last, commits them."""
    _save(tmp_path, 3, finished=False)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("3")
    assert _problems(tmp_path) == {"iter_0000003": None}


def test_cleanup_keeps_the_newest_complete_checkpoints_never_torn_ones_in_their_place(tmp_path):
    """keep_last=2 with two torn checkpoints newer than the complete ones: the two newest complete ones stay
    (the old code kept the two newest folders: the torn ones), the torn ones stay for inspection, older go."""
    for step in (1, 2, 3, 4, 5):
        _save(tmp_path, step, finished=step != 5)
    with _shard(tmp_path / "iter_0000004").open("r+b") as shard:
        shard.truncate(10)
    remove_old_checkpoints(tmp_path, keep_last=2)
    assert sorted(folder.name for folder in tmp_path.glob("iter_*")) == [
        "iter_0000002", "iter_0000003", "iter_0000004", "iter_0000005"
    ]


@pytest.mark.parametrize("value, expected", [("true", True), ("false", False), ("strict", "strict")])
def test_trainer_resume_takes_booleans_and_strict(value, expected):
    assert load_config(None, [f"trainer.resume={value}"]).trainer.resume == expected


def test_trainer_resume_refuses_anything_else_naming_the_key():
    with pytest.raises(ConfigError, match=r"trainer\.resume='sometimes' must be one of: bool, \['strict'\]"):
        load_config(None, ["trainer.resume=sometimes"])
