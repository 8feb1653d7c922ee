"""Rollout across the job: the toy run under torchrun with 1, 2 and 4 engines (2 and 4 processes) gives the
single-process run's step metrics, the engines after each in-job sync equal the actor, and nothing depends on
how many threads a process has (each command runs as a user types it)."""

import subprocess
import sys

import pytest

from ..helpers import ROOT, TOY_CONFIG, training_rows

pytestmark = pytest.mark.slow

RUN = ["trainer.max_steps=3", "algorithm.max_num_gen_batches=0", "data.toy_num_val=8",
       "rollout.val_n=2", "logging.progress_bar=false", "parallel.micro_batch_size=16", "trainer.export_hf=false"]
# The same for every engine count: the groups kept and every sample in them; the training metrics up to the
# summation order of another layout.
EXACT = ["acc/mean", "reward/mean", "response_length/mean", "sampling/kept_group_frac", "sampling/num_gen_batches",
         "sampling/zero_std_all_correct", "sampling/zero_std_all_wrong"]
CLOSE = ["actor/pg_loss", "actor/grad_norm", "entropy/mean", "prob/mean"]


def _run(out, nproc, warm_start, *overrides):
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     "--nproc-per-node", str(nproc)]
    command = [*launcher, "-m", "megatron_dapo", "train", "--config", str(TOY_CONFIG), f"trainer.output_dir={out}", *RUN, warm_start, *overrides]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    eval_line = [line for line in result.stdout.splitlines() if line.startswith("eval accuracy:")]
    assert len(eval_line) == 1  # rank 0 alone prints it
    return training_rows(out), eval_line[0]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, toy_warm_start):
    return _run(tmp_path_factory.mktemp("single"), 1, toy_warm_start)


@pytest.mark.parametrize(
    "nproc, layout",
    [
        (2, ["parallel.tensor_model_parallel_size=2", "rollout.ranks_per_engine=1"]),  # 2 engines
        (2, ["parallel.pipeline_model_parallel_size=2", "rollout.ranks_per_engine=2"]),  # 1 engine over 2 ranks
        (4, ["rollout.ranks_per_engine=1"]),  # DP=4, 4 engines
        (4, ["parallel.tensor_model_parallel_size=2", "rollout.ranks_per_engine=2", "rollout.weight_sync_transport=collectives"]),
    ],
    ids=["tp2-2engines", "pp2-1engine", "dp4-4engines", "tp2dp2-2engines-collectives"],
)
def test_metrics_do_not_depend_on_the_engine_count(single_process, toy_warm_start, tmp_path, nproc, layout):
    expected, expected_eval = single_process
    rows, eval_line = _run(tmp_path, nproc, toy_warm_start, *layout)
    assert eval_line == expected_eval  # evaluation is spread over the engines too, seeded per problem
    for step in range(3):
        for key in EXACT:
            assert rows[step][key] == expected[step][key], (step + 1, key)
        for key in CLOSE:
            assert rows[step][key] == pytest.approx(expected[step][key], rel=1e-4, abs=1e-6), (step + 1, key)
        # every engine, after the sync of the previous step's update, reports the actor's log-probs
        assert rows[step]["rollout/train_logprob_abs_diff"] < 1e-4
