"""End-to-end runs of the CLI (each in a fresh process, as a user runs it)."""

import json
import re

import pytest
import torch

from ..helpers import metrics_rows, run_cli, training_rows

pytestmark = pytest.mark.slow  # multi-process or end-to-end: minutes on 2 cores

FINAL_LINE = re.compile(r"^eval accuracy: before=(\d\.\d+) after=(\d\.\d+)$")
REQUIRED_METRICS = [
    "actor/pg_loss", "actor/grad_norm", "reward/mean", "acc/mean", "response_length/mean",
    "response_length/clip_ratio", "entropy/mean", "entropy/trained_mean", "prob/mean", "pg_clipfrac/high",
    "pg_clipfrac/low", "actor/ppo_kl", "sampling/zero_adv_token_frac",
    "sampling/num_gen_batches", "sampling/kept_group_frac", "rollout/train_logprob_abs_diff",
    "timing/generate", "timing/old_logprob", "timing/train", "timing/sync", "timing/step",
    "perf/dp_cost_imbalance", "rollout/engine_idle_frac",
]


def _final_accuracies(result):
    assert result.returncode == 0, result.stderr[-3000:]
    match = FINAL_LINE.match(result.stdout.strip().splitlines()[-1])
    assert match, result.stdout[-500:]
    return float(match.group(1)), float(match.group(2))


def test_short_toy_run_writes_metrics_tensorboard_and_hf_export(tmp_path, toy_warm_start):
    out = tmp_path / "run"
    result = run_cli(f"trainer.output_dir={out}", "trainer.max_steps=3", toy_warm_start,
                     "algorithm.max_num_gen_batches=0", "data.toy_num_val=8", "rollout.val_n=4")
    before, after = _final_accuracies(result)
    assert 0.0 <= before <= 1.0 and 0.0 <= after <= 1.0

    rows = metrics_rows(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]  # step 0: the evaluation before training
    assert f"{rows[0]['eval/toy-arithmetic/avg@4']:.3f}" == f"{before:.3f}"
    assert f"{rows[-1]['eval/toy-arithmetic/avg@4']:.3f}" == f"{after:.3f}"
    assert ["eval/toy-arithmetic/avg@4" in r for r in rows] == [True, False, False, True]  # eval_interval=0
    rows = rows[1:]
    for key in REQUIRED_METRICS:
        assert all(isinstance(r[key], float) for r in rows), key
    assert all(r["rollout/train_logprob_abs_diff"] < 1e-3 for r in rows)  # sync health
    assert all(0.0 < r["sampling/kept_group_frac"] <= 1.0 for r in rows)
    assert all(r["perf/dp_cost_imbalance"] == 1.0 for r in rows)  # one data-parallel rank: nothing to balance
    assert all(0.0 <= r["rollout/engine_idle_frac"] < 1.0 for r in rows)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("actor/pg_loss")] == [1, 2, 3]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "hf_final")
    tokenizer = AutoTokenizer.from_pretrained(out / "hf_final")
    initial = AutoModelForCausalLM.from_pretrained(toy_warm_start.split("=", 1)[1])
    ids = torch.tensor([tokenizer.encode("12+30=Answer: 42")])
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, initial(ids).logits)  # the policy was trained and exported


def test_bad_dataset_row_gives_one_line_error(tmp_path):
    rows = [
        {"prompt": [{"role": "user", "content": "1+1="}], "reward_model": {"ground_truth": "2"}},
        {"prompt": [{"role": "user", "content": "2+2="}], "reward_model": {"style": "rule"}},
    ]
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_cli(f"trainer.output_dir={tmp_path / 'run'}", f"data.train_files=[{data}]", timeout=300)
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and str(data) in message and "row 1" in message
    assert "reward_model.ground_truth" in message


def test_dynamic_sampling_starvation_is_a_clear_error(tmp_path):
    result = run_cli(f"trainer.output_dir={tmp_path / 'run'}", "toy_model.sft_steps=0", "algorithm.max_num_gen_batches=2", timeout=300)
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()[-1]
    assert "algorithm.max_num_gen_batches=2" in message and "train_batch_size" in message


def test_default_toy_run_learns(tmp_path):
    """The README's main job: held-out accuracy rises by at least 20 points."""
    before, after = _final_accuracies(run_cli(f"trainer.output_dir={tmp_path / 'run'}"))
    assert after - before >= 0.20, (before, after)


NAIVE_GRPO = [  # the paper's "naive GRPO" baseline is a config, not a code fork
    "algorithm.kl_coef=0.01", "algorithm.loss_agg_mode=seq-mean-token-mean", "algorithm.dynamic_sampling=false",
    "algorithm.clip_ratio_high=0.2", "algorithm.clip_ratio_c=null", "algorithm.overlong_buffer_enable=false",
    "algorithm.tis_cap=null",
]


def test_naive_grpo_baseline_runs_with_kl_to_reference(tmp_path, toy_warm_start):
    out = tmp_path / "run"
    result = run_cli(f"trainer.output_dir={out}", "trainer.max_steps=3", toy_warm_start,
                     "optimizer.lr=1e-3", "data.toy_num_val=4", "rollout.val_n=2", *NAIVE_GRPO)
    _final_accuracies(result)
    rows = training_rows(out)
    assert rows[0]["actor/kl_ref"] == pytest.approx(0.0, abs=1e-6)  # first update: policy == reference
    assert rows[-1]["actor/kl_ref"] > 0.0
    # no dynamic sampling: every drawn group is used, exactly train_batch_size (16) of the 24 a round would draw
    assert all(r["sampling/kept_group_frac"] == 1.0 and r["sampling/num_gen_batches"] == 16 / 24 for r in rows)
