"""GPU only (skipped without CUDA): the toy run with a real SGLang engine, Transformer Engine, NCCL and bf16.

Ready for the first machine with a GPU; it has not run yet. Checks that the weights synced into SGLang
reproduce the actor's log-probs (bf16 on both sides) and that the run learns nothing absurd.
"""


import pytest

from ..helpers import run_cli, training_rows

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_sglang_engine_receives_the_actors_weights(tmp_path):
    pytest.importorskip("sglang")
    out = tmp_path / "run"
    result = run_cli(f"trainer.output_dir={out}", "rollout.engine=sglang", "model.bf16=true",
                     "model.offload_during_rollout=true", "trainer.max_steps=3", "toy_model.sft_steps=300",
                     "algorithm.max_num_gen_batches=0", "data.toy_num_val=8", "rollout.val_n=2", timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = training_rows(out)
    assert len(rows) == 3
    for row in rows:  # every step samples from weights synced from the actor (step 1: the start-up sync)
        assert row["rollout/train_logprob_abs_diff"] < 0.05, row["rollout/train_logprob_abs_diff"]
