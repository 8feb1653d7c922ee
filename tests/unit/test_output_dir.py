"""An output directory has one owner (docs/reliability.md, "Output directories and inputs")."""

import os
import socket
import subprocess
import sys

import pytest

from megatron_dapo.config import ToyModelConfig, TrainerConfig
from megatron_dapo.output_dir import LOCK_FILE, OutputDirError, OutputLock, claim_output_dir
from megatron_dapo.toy import build_toy_tokenizer, toy_hf_config

from ..helpers import write_torch_dist_checkpoint


def _toy_config(**changes):
    return toy_hf_config(ToyModelConfig(**changes), build_toy_tokenizer())


def test_lock_holds_host_and_pid_and_a_second_owner_is_refused(tmp_path):
    lock = OutputLock(tmp_path)
    assert (tmp_path / LOCK_FILE).read_text().split() == [socket.gethostname(), str(os.getpid()), "-"]
    with pytest.raises(OutputDirError, match=f"in use by the run of pid {os.getpid()} on host"):
        OutputLock(tmp_path)
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists() and os.listdir(tmp_path) == []
    OutputLock(tmp_path).release()


def test_a_stale_lock_is_taken_over_with_a_notice(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_FILE).write_text(f"{socket.gethostname()} {dead.stdout.strip()} -\n")
    lock = OutputLock(tmp_path)
    assert f"taking over the stale lock of pid {dead.stdout.strip()}" in capsys.readouterr().out
    assert (tmp_path / LOCK_FILE).read_text().split()[1] == str(os.getpid())
    lock.release()


def test_a_lock_of_another_host_is_not_taken_over_unless_it_is_this_slurm_jobs(tmp_path, monkeypatch, capsys):
    (tmp_path / LOCK_FILE).write_text("some-other-host 1 77\n")
    with pytest.raises(OutputDirError, match="pid 1 on host some-other-host"):
        OutputLock(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # the job requeued onto another node
    OutputLock(tmp_path).release()
    assert "taking over the stale lock of pid 1 on some-other-host (an earlier run of Slurm job 77)" in capsys.readouterr().out


def test_another_runs_output_without_checkpoint_is_refused_and_kept(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "config.yaml").write_text("old: run\n")
    trainer = TrainerConfig(output_dir=str(tmp_path))
    with pytest.raises(OutputDirError) as refused:
        claim_output_dir(trainer, tmp_path / "checkpoints", _toy_config())
    message = str(refused.value)
    assert "metrics.jsonl, config.yaml" in message and "no checkpoint to resume" in message
    assert all(fix in message for fix in ("trainer.resume=true", "new trainer.output_dir", "trainer.overwrite=true"))
    assert (tmp_path / "config.yaml").read_text() == "old: run\n"


def test_overwrite_removes_the_old_output_and_says_what(tmp_path, capsys):
    for name in ("metrics.jsonl", "report.png", "config.yaml"):
        (tmp_path / name).write_text("x")
    (tmp_path / "hf_final").mkdir()
    (tmp_path / "checkpoints" / "iter_0000001").mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("1")
    (tmp_path / "data").mkdir()
    claim_output_dir(TrainerConfig(output_dir=str(tmp_path), overwrite=True), tmp_path / "checkpoints", _toy_config())
    assert sorted(os.listdir(tmp_path)) == ["checkpoints", "data"] and os.listdir(tmp_path / "checkpoints") == []
    notice = capsys.readouterr().out
    assert notice.startswith("output: trainer.overwrite=true: removed ") and "hf_final" in notice


def test_a_resume_is_allowed_only_of_the_same_model(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    saved = write_torch_dist_checkpoint(tmp_path / "checkpoints", 1)
    _toy_config().save_pretrained(saved / "hf_config")
    (tmp_path / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("1")
    claim_output_dir(TrainerConfig(output_dir=str(tmp_path)), tmp_path / "checkpoints", _toy_config())
    with pytest.raises(OutputDirError, match="trainer.resume=false"):
        claim_output_dir(TrainerConfig(output_dir=str(tmp_path), resume=False), tmp_path / "checkpoints", _toy_config())
    with pytest.raises(Exception, match="'hidden_size' is 64 .* belong to different models"):
        claim_output_dir(TrainerConfig(output_dir=str(tmp_path)), tmp_path / "checkpoints", _toy_config(hidden_size=64))


def test_an_empty_or_new_folder_is_free(tmp_path):
    claim_output_dir(TrainerConfig(output_dir=str(tmp_path / "new")), tmp_path / "new" / "checkpoints", _toy_config())
    assert not (tmp_path / "new").exists()
