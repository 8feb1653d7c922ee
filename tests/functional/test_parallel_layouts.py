"""Issue 3: under TP, PP, DP, TP×PP, interleaved PP (4 processes, gloo) and 4 micro-batches per rank, the actor's log-probs,
DAPO loss and every parameter's gradient equal the single-process, single-batch ``transformers`` reference.

The batch mixes responses of 1 to 37 tokens (the case that breaks per-micro-batch normalisation).
Each layout is one ``torchrun`` launch of ``workers/layout_worker.py``. Issue 19: the
data-parallel ranks get the cost-balanced partition (the default; one layout keeps consecutive slices), and
token-budget micro-batches run under TP2×DP2 with sequence parallelism, PP2×DP2 and DP4: the gradient is the same.
"""

import os
import subprocess
import sys

import pytest
import torch

from megatron_dapo.algorithm import policy_loss

from ..helpers import ROOT, hf_logprobs, make_tiny_qwen2

pytestmark = pytest.mark.slow  # multi-process or end-to-end: minutes on 2 cores

LAYOUTS = {
    "tp2-dp2-sp-fused_linear-budget": ["--tp", "2", "--micro", "2", "--sp", "--loss-impl", "fused_linear",
                                       "--max-tokens", "64"],
    "pp2-dp2-naive-budget": ["--pp", "2", "--micro", "2", "--loss-impl", "naive", "--max-tokens", "40"],
    "tp2-pp2-fused": ["--tp", "2", "--pp", "2", "--micro", "4"],
    "pp2-vpp2-dp2-interleaved-consecutive": ["--pp", "2", "--vpp", "2", "--micro", "2", "--consecutive"],
    "dp4-budget": ["--micro", "2", "--max-tokens", "48"],
}
MODES = ("token-mean", "seq-mean-token-mean")
TRANSPORTS = ("shared_memory", "collectives")
RESPONSE_LENGTHS = [1, 37, 2, 30, 3, 5, 24, 1, 12, 36, 4, 8, 2, 17, 33, 6]


def _batch(reference) -> dict:
    generator = torch.Generator().manual_seed(7)
    num, width = len(RESPONSE_LENGTHS), 44
    input_ids = torch.randint(2, 50, (num, width), generator=generator)
    loss_mask = torch.zeros(num, width)
    for row, response in enumerate(RESPONSE_LENGTHS):
        prompt = 2 + row % 5
        loss_mask[row, prompt - 1 : prompt - 1 + response] = 1
        input_ids[row, prompt + response :] = 0
    labels = torch.cat([input_ids[:, 1:], torch.zeros(num, 1, dtype=torch.long)], dim=1)
    advantages = torch.randn(num, 1, generator=generator).expand(num, width).contiguous()
    batch = {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask, "advantages": advantages}
    with torch.no_grad():
        batch["old_logprobs"] = hf_logprobs(reference, batch) + 0.3 * torch.randn(num, width, generator=generator)
    return batch


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("layouts")
    references = {name: make_tiny_qwen2(work / name, tied=name == "tied", num_layers=4) for name in ("untied", "tied")}
    batch = _batch(references["untied"])
    torch.save(batch, work / "batch.pt")
    return work, references, batch


def _launch(work, name, args, nproc=4):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "tests.functional.workers.layout_worker", "--work", str(work), "--name", name, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(work / f"{name}.pt")


def _relative_error(got, expected):
    return ((got - expected).norm() / expected.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process_reference(work, layout):
    work_dir, references, batch = work
    results = _launch(work_dir, layout, LAYOUTS[layout])
    mask = batch["loss_mask"].bool()
    for model_name, reference in references.items():
        with torch.no_grad():
            expected_logprobs = hf_logprobs(reference, batch)
        assert (results[f"{model_name}/logprobs"] - expected_logprobs)[mask].abs().max() < 1e-5, model_name
        for mode in MODES:
            reference.zero_grad()
            loss, _ = policy_loss(hf_logprobs(reference, batch), batch["old_logprobs"], batch["advantages"],
                                  batch["loss_mask"], clip_ratio_c=10.0, loss_agg_mode=mode)
            loss.backward()
            assert results[f"{model_name}/{mode}/loss"] == pytest.approx(loss.item(), rel=1e-5)
            expected = dict(reference.named_parameters())
            for transport in TRANSPORTS:  # gradients gathered by either resharder transport
                grads = results[f"{model_name}/{mode}/grads/{transport}"]
                assert set(grads) == set(expected) - ({"lm_head.weight"} if model_name == "tied" else set())
                for name, grad in grads.items():
                    error = _relative_error(grad, expected[name].grad)
                    assert error < 1e-5, f"{model_name} {mode} {name} ({transport}): relative error {error:.2e}"


def test_distributed_optimizer_step_matches_adamw_reference(work):
    """TP=2 × DP=2 with the distributed optimizer: one Adam step lands where torch AdamW takes the reference."""
    work_dir, references, batch = work
    results = _launch(work_dir, "tp2-dp2-distopt", ["--tp", "2", "--micro", "4", "--distopt"])
    for model_name, reference in references.items():
        reference.zero_grad()
        loss, _ = policy_loss(hf_logprobs(reference, batch), batch["old_logprobs"], batch["advantages"],
                              batch["loss_mask"], clip_ratio_c=10.0, loss_agg_mode="token-mean")
        loss.backward()
        before = {name: p.detach().clone() for name, p in reference.named_parameters()}
        torch.optim.AdamW(reference.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0).step()
        params = results[f"{model_name}/params_after_step/shared_memory"]
        collected = results[f"{model_name}/params_after_step/collectives"]
        assert set(collected) == set(params) and all(torch.equal(collected[n], params[n]) for n in params)
        for name, param in reference.named_parameters():
            if name not in params:
                continue
            # Adam's first step is lr·g/(|g| + eps): entries whose gradient is rounding noise (|g| < 1e-6, e.g.
            # the key bias, which shifts all of a query's scores equally) move by an arbitrary ±lr.
            decided = param.grad.abs() > 1e-6
            assert torch.allclose(params[name][decided], param.detach()[decided], atol=2e-6, rtol=0), name
            assert (params[name] - before[name]).abs().le(1e-3 + 1e-7).all(), name
            assert (params[name] - before[name])[decided].abs().min() > 5e-4, name  # the step moved them
