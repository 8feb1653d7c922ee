"""docs/pitfalls.md, 6: a run killed after step 1 and resumed equals the uninterrupted run (model, Adam state, LR
schedule, data cursor with the prompts a streamed step gave back, engine weights all restored); a
half-written checkpoint is never the latest."""

import json

import pytest

from ..helpers import run_cli

pytestmark = pytest.mark.slow  # multi-process or end-to-end: minutes on 2 cores

SMALL = ["toy_model.sft_steps=300", "algorithm.max_num_gen_batches=0", "data.toy_num_val=4", "rollout.val_n=2",
         "trainer.save_interval=1", "trainer.export_hf=false", "optimizer.lr_warmup_steps=2"]
COMPARED = ["actor/pg_loss", "actor/grad_norm", "actor/lr", "acc/mean", "reward/mean", "entropy/mean",
            "rollout/train_logprob_abs_diff"]


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run_cli(f"trainer.output_dir={whole}", "trainer.max_steps=3", *SMALL).returncode == 0
    assert run_cli(f"trainer.output_dir={split}", "trainer.max_steps=1", *SMALL).returncode == 0
    # a job killed while writing checkpoint 2 leaves a partial folder that must not be picked up
    (split / "checkpoints" / "iter_0000002").mkdir()
    (split / "checkpoints" / "iter_0000002" / "__0_0.distcp").write_bytes(b"partial")
    result = run_cli(f"trainer.output_dir={split}", "trainer.max_steps=3", *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    expected, resumed = _rows(whole), _rows(split)
    assert [r["step"] for r in resumed] == [1, 2, 3]
    # step 1's stream generated groups past the training batch: their prompts went back to the sampler, whose
    # checkpointed state carries them into step 2
    assert expected[0]["sampling/generated_groups"] > expected[0]["sampling/num_gen_batches"] * 24
    for step in (2, 3):  # step 3 depends on the Adam moments and step count restored from step 1's checkpoint
        for key in COMPARED:
            assert resumed[step - 1][key] == pytest.approx(expected[step - 1][key], rel=1e-6, abs=1e-9), (step, key)
    assert (split / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "3"


def test_distributed_optimizer_resume_on_the_torch_adam_fallback_is_refused_with_the_fix(tmp_path):
    """megatron-core 0.16.1 cannot load distributed-optimizer state without TE/Apex: one clear line, exit 2,
    and the checkpoint that was written stays intact."""
    out = tmp_path / "run"
    args = [f"trainer.output_dir={out}", "parallel.use_distributed_optimizer=true", *SMALL]
    assert run_cli("trainer.max_steps=1", *args).returncode == 0
    result = run_cli("trainer.max_steps=2", *args)
    assert result.returncode == 2
    assert "parallel.use_distributed_optimizer=true" in result.stderr and "trainer.resume=false" in result.stderr
    assert (out / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "1"
