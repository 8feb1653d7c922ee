"""Evaluation during training (``trainer.eval_interval``) and ``megatron-dapo eval`` of the exported policy, which
repeats the run's last evaluation; the eval command's one-line errors."""

import json
import re

import pytest

from ..helpers import run_cli

pytestmark = pytest.mark.slow  # end-to-end: minutes on 2 cores

TOY = ["data.toy_num_val=8", "algorithm.max_num_gen_batches=0"]
SOURCE = "eval/toy-arithmetic"
EVAL_KEYS = {f"{SOURCE}/{name}@{k}" for name in ("avg", "pass") for k in (1, 2, 4)}  # val_n = 4
TRAINING_LINE = re.compile(r"^eval accuracy: before=(\d\.\d{3}) after=(\d\.\d{3})$")
EVAL_LINE = re.compile(r"^eval: avg@4=(\d\.\d{3}) pass@4=(\d\.\d{3})$")


def test_evaluations_are_logged_and_the_exported_policy_evaluates_the_same(tmp_path, toy_warm_start):
    out = tmp_path / "run"
    trained = run_cli(f"trainer.output_dir={out}", "trainer.max_steps=2", "trainer.eval_interval=1", "rollout.val_n=4", *TOY,
                      toy_warm_start)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert re.search(r"^data: .*train\.parquet: kept \d+ of 2000 rows \(\d+ duplicates dropped", trained.stdout, re.M)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]  # before training in a row of its own, then each step's row
    assert "actor/pg_loss" not in rows[0] and all("actor/pg_loss" in r for r in rows[1:])
    for row in rows:
        assert {key for key in row if key.startswith("eval/")} == EVAL_KEYS
        avg = row[f"{SOURCE}/avg@4"]
        assert row[f"{SOURCE}/avg@1"] == row[f"{SOURCE}/avg@2"] == avg  # avg@k: the mean of all samples, any k
        assert row[f"{SOURCE}/pass@1"] == pytest.approx(avg)
        assert row[f"{SOURCE}/pass@1"] <= row[f"{SOURCE}/pass@2"] <= row[f"{SOURCE}/pass@4"]
        assert row["timing/eval"] > 0
        # 8 problems × 4 samples: accuracies are multiples of 1/32, pass@4 of 1/8
        assert (avg * 32) == pytest.approx(round(avg * 32)) and (row[f"{SOURCE}/pass@4"] * 8) == pytest.approx(round(row[f"{SOURCE}/pass@4"] * 8))
    before, after = TRAINING_LINE.match(trained.stdout.strip().splitlines()[-1]).groups()
    assert (before, after) == (f"{rows[0][f'{SOURCE}/avg@4']:.3f}", f"{rows[-1][f'{SOURCE}/avg@4']:.3f}")

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars(f"{SOURCE}/pass@2")] == [0, 1, 2]
    assert [e.step for e in events.Scalars("actor/pg_loss")] == [1, 2]

    # the exported policy, evaluated on its own: the run's last evaluation (same weights, same seeds)
    evaluated = run_cli("--hf-dir", str(out / "hf_final"), f"trainer.output_dir={tmp_path / 'eval'}", "rollout.val_n=4",
                        *TOY, command="eval")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    lines = evaluated.stdout.strip().splitlines()
    avg, pass_at_4 = EVAL_LINE.match(lines[-1]).groups()
    assert (avg, pass_at_4) == (f"{rows[-1][f'{SOURCE}/avg@4']:.3f}", f"{rows[-1][f'{SOURCE}/pass@4']:.3f}")
    printed = dict(line.split(" = ") for line in lines if line.startswith("eval/"))
    assert set(printed) == EVAL_KEYS
    for key, value in printed.items():
        assert float(value) == pytest.approx(rows[-1][key], abs=5e-5), key


def test_eval_command_errors_are_one_line(tmp_path):
    no_config = tmp_path / "empty"
    no_config.mkdir()
    no_tokenizer = tmp_path / "weights_only"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text("{}")
    cases = [
        ([], "megatron-dapo eval needs --hf-dir <folder>"),
        (["--hf-dir", str(tmp_path / "missing")], "no such folder"),
        (["--hf-dir", str(no_config)], "has no config.json"),
        (["--hf-dir", str(no_tokenizer)], "has no tokenizer"),
    ]
    for args, expected in cases:
        result = run_cli(*args, f"trainer.output_dir={tmp_path / 'out'}", command="eval", timeout=120)
        assert result.returncode == 2, result.stderr[-2000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and errors[0] == result.stderr.strip().splitlines()[-1], result.stderr[-2000:]
        assert expected in errors[0] and ("--hf-dir" in errors[0]), errors[0]
    assert not (tmp_path / "out").exists()  # nothing was written
