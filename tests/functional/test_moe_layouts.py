"""Issue 18: a Qwen3-MoE actor under expert parallelism (EP2, TP2×EP2, ETP2, PP2×EP2, DP2×EP2, EP4; gloo) and a
Qwen3 dense one under TP2 with sequence parallelism: log-probs, the DAPO loss and every gradient equal the
single-process ``transformers`` reference; after an optimiser step both resharder transports deliver every
expert to two receivers, and a ``transformers`` engine loaded with those weights gives the actor's log-probs."""

import os
import subprocess
import sys

import pytest
import torch

from megatron_dapo.algorithm import policy_loss
from megatron_dapo.rollout import HFRolloutEngine

from ..helpers import ROOT, checkpoint_named, hf_logprobs, make_tiny_qwen3
from .test_parallel_layouts import _batch, _relative_error

pytestmark = pytest.mark.slow  # multi-process: minutes on 2 cores

LAYOUTS = {  # name: (processes, worker arguments)
    "ep2": (2, ["--ep", "2", "--micro", "4"]),
    "tp2-sp-ep2-etp1-dp2": (4, ["--tp", "2", "--sp", "--ep", "2", "--etp", "1"]),
    "tp2-sp-etp2-dp2": (4, ["--tp", "2", "--sp"]),  # EP1: each expert's matrices split over ETP = TP
    "pp2-ep2-dp2": (4, ["--pp", "2", "--ep", "2"]),
    "ep4-dp4": (4, ["--ep", "4"]),
    "dense-tp2-sp-dp2": (4, ["--model", "dense", "--tp", "2", "--sp"]),
}
TRANSPORTS = ("shared_memory", "collectives")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("moe_layouts")
    references = {"moe": make_tiny_qwen3(work / "moe", moe=True, num_layers=4),
                  "dense": make_tiny_qwen3(work / "dense", moe=False, num_layers=4)}
    batch = _batch(references["moe"])
    torch.save(batch, work / "batch.pt")
    return work, references, batch


def _launch(work, name, nproc, args):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "tests.functional.workers.moe_layout_worker", "--work", str(work), "--name", name, *args]
    result = subprocess.run(command, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(work / f"{name}.rank{rank}.pt") for rank in (0, nproc - 1)]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_moe_layout_matches_transformers(work, layout):
    work_dir, references, batch = work
    nproc, args = LAYOUTS[layout]
    first, last = _launch(work_dir, layout, nproc, args)
    reference = references["dense" if "--model" in args else "moe"]
    mask = batch["loss_mask"].bool()
    with torch.no_grad():
        assert (first["logprobs"] - hf_logprobs(reference, batch))[mask].abs().max() < 1e-5
    reference.zero_grad()
    loss, _ = policy_loss(hf_logprobs(reference, batch), batch["old_logprobs"], batch["advantages"], batch["loss_mask"],
                          clip_ratio_c=10.0, loss_agg_mode="token-mean")
    loss.backward()
    assert first["loss"] == pytest.approx(loss.item(), rel=1e-5)
    expected = checkpoint_named({name: p.grad for name, p in reference.named_parameters()})
    for transport in TRANSPORTS:
        grads = first[f"grads/{transport}"]
        assert set(grads) == set(expected), transport
        for name, grad in grads.items():
            error = _relative_error(grad, expected[name])
            assert error < 1e-5, f"{name} ({transport}): relative error {error:.2e}"
        for receiver in (first, last):  # both receivers hold the same full weights after the step
            weights = receiver[f"weights/{transport}"]
            assert set(weights) == set(expected)
            assert all(torch.equal(weights[n], first["weights/shared_memory"][n]) for n in weights), transport
    engine = HFRolloutEngine.from_pretrained(str(work_dir / ("dense" if "--model" in args else "moe")), 0, 1)
    engine.update_weights([list(first["weights/collectives"].items())])
    with torch.no_grad():
        synced = hf_logprobs(engine.model, batch)
    assert (synced - first["logprobs_after_step"])[mask].abs().max() < 1e-4
    assert (first["logprobs_after_step"] - first["logprobs"])[mask].abs().max() > 1e-3  # the step moved the policy
