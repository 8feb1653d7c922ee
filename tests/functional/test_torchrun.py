"""The same CLI under torchrun: 2-process TP=2 and PP=2 jobs (gloo) match the 1-process run's first step,
and after the in-job weight sync the CPU engine's log-probs equal the actor's within 1e-4."""

import subprocess
import sys

import pytest

from ..helpers import ROOT, TOY_CONFIG, assert_hf_folders_bit_identical, convert, training_rows

pytestmark = pytest.mark.slow  # multi-process or end-to-end: minutes on 2 cores

SMALL_RUN = ["trainer.max_steps=2", "algorithm.max_num_gen_batches=0",
             "data.toy_num_val=4", "rollout.val_n=2", "logging.progress_bar=false"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _first_step(launcher, out, *overrides):
    """The run as a user types it (torchrun's workers get one thread each, the plain run all cores)."""
    command = [*launcher, "-m", "megatron_dapo", "train", "--config", str(TOY_CONFIG), f"trainer.output_dir={out}", *SMALL_RUN, *overrides]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("eval accuracy:") == 1  # printed by rank 0 only
    rows = training_rows(out)
    # step 2 samples from the engine after the in-job sync of step 1's update: it must match the actor
    assert rows[1]["rollout/train_logprob_abs_diff"] < 1e-4
    return rows[0]


@pytest.fixture(scope="module")
def single_process_step(tmp_path_factory, toy_warm_start):
    return _first_step([sys.executable], tmp_path_factory.mktemp("single"), toy_warm_start)


@pytest.mark.parametrize(
    "layout",
    [
        ["parallel.tensor_model_parallel_size=2"],
        ["parallel.pipeline_model_parallel_size=2", "rollout.weight_sync_transport=collectives"],
        ["parallel.tensor_model_parallel_size=2", "model.loss_impl=fused_linear", "rollout.weight_sync_transport=collectives"],
        ["parallel.tensor_model_parallel_size=2", "model.loss_impl=naive"],
        ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true", "parallel.use_distributed_optimizer=true"],
    ],
    ids=["tp2", "pp2-collectives", "tp2-fused_linear-collectives", "tp2-naive", "tp2-sp-distopt"],
)
def test_two_process_layout_matches_single_process(single_process_step, toy_warm_start, tmp_path, layout):
    parallel = _first_step(TORCHRUN, tmp_path, toy_warm_start, *layout)
    assert parallel["acc/mean"] == single_process_step["acc/mean"]  # same rollouts: they do not depend on the layout
    for key in ("actor/pg_loss", "actor/grad_norm", "entropy/mean", "rollout/train_logprob_abs_diff"):
        assert parallel[key] == pytest.approx(single_process_step[key], rel=1e-4, abs=1e-6), key


def test_interleaved_pipeline_matches_single_process_and_its_checkpoint_converts(tmp_path):
    """PP=2 × 2 virtual stages (4-layer toy): same first step as one process; its checkpoint converts to HF
    equal to the run's own HF export."""
    four_layers = ["toy_model.num_hidden_layers=4", "trainer.save_interval=2", "trainer.export_hf=true"]
    single = _first_step([sys.executable], tmp_path / "single", *four_layers, "toy_model.sft_steps=300")
    interleaved = _first_step(TORCHRUN, tmp_path / "vpp", *four_layers, f"model.hf_path={tmp_path / 'single' / 'toy_init'}",
                              "parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2")
    assert interleaved["acc/mean"] == single["acc/mean"]
    for key in ("actor/pg_loss", "actor/grad_norm", "entropy/mean"):
        assert interleaved[key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), key
    convert("megatron_to_hf.py", "--load", str(tmp_path / "vpp" / "checkpoints"), "--out", str(tmp_path / "converted"),
             "--no-progress")
    assert_hf_folders_bit_identical(tmp_path / "converted", tmp_path / "vpp" / "hf_final")
