"""The MoE toy (examples/configs/toy_moe_cpu.yaml, a tiny Qwen3-MoE): it learns in one process, and an EP2 job
under torchrun gives the same steps as the one-process run."""

import subprocess
import sys

import pytest

from ..helpers import ROOT, training_rows

pytestmark = pytest.mark.slow  # end-to-end runs: minutes on 2 cores

MOE_CONFIG = ROOT / "examples" / "configs" / "toy_moe_cpu.yaml"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _train(launcher, out, *overrides):
    command = [*launcher, "-m", "megatron_dapo", "train", "--config", str(MOE_CONFIG), f"trainer.output_dir={out}",
               "logging.progress_bar=false", *overrides]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe_toy")
    return out, _train([sys.executable], out)


def test_the_moe_toy_learns_and_logs_its_routing(learned_run):
    out, stdout = learned_run
    before, after = (float(part.split("=")[1]) for part in stdout.split("eval accuracy:")[1].split())
    assert after - before >= 0.2, stdout[-500:]
    rows = training_rows(out)
    for row in rows:
        assert row["moe/routing_agreement"] == 1.0  # routing_replay: rollout and one engine: the actor's router agrees
        assert row["moe/expert_load_max_over_mean"] >= 1.0
        assert row["moe/aux_loss"] > 0.0  # logged although algorithm.moe_aux_loss_coef is 0


def test_ep2_steps_equal_the_one_process_steps(learned_run, tmp_path):
    """EP2 (each rank holds 4 of the 8 experts, tokens travel by all-to-all) from the same warm start: rollouts
    identical, losses and gradient norms within 1e-4 of the one-process run; the engines equal the actor after
    each sync."""
    out, _ = learned_run
    short = ["trainer.max_steps=2", f"model.hf_path={out / 'toy_init'}", "trainer.export_hf=false",
             "data.toy_num_val=4", "rollout.val_n=2"]
    _train([sys.executable], tmp_path / "one", *short)
    _train(TORCHRUN, tmp_path / "ep2", *short, "parallel.expert_model_parallel_size=2")
    one, ep2 = training_rows(tmp_path / "one"), training_rows(tmp_path / "ep2")
    assert len(one) == len(ep2) == 2
    for single, parallel in zip(one, ep2):
        assert parallel["acc/mean"] == single["acc/mean"]
        for key in ("actor/pg_loss", "actor/grad_norm", "entropy/mean", "moe/aux_loss", "moe/expert_load_max_over_mean"):
            assert parallel[key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), key
        assert parallel["rollout/train_logprob_abs_diff"] < 1e-4
