"""Issue 4: one mapping serves HF import, in-job export and the offline converters, under any layout.

HF → ``hf_to_megatron.py`` → actor at TP=2×PP=2 (loading that checkpoint, not HF weights) → in-job HF
export and a saved checkpoint → ``megatron_to_hf.py`` → ``hf_to_megatron.py`` → actor at TP=1×PP=1 and
TP=1×PP=2. Every HF folder on the way is bit-identical to the original per tensor; every layout's
log-probs equal ``transformers`` on the original within 1e-5.
"""

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from ..helpers import (
    ROOT, assert_hf_folders_bit_identical, build_actor, convert, hf_logprobs, make_tiny_qwen2, make_tiny_qwen3, test_config,
)
from .test_parallel_layouts import _batch as _training_batch

pytestmark = pytest.mark.slow  # multi-process or end-to-end: minutes on 2 cores

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
WORKER = ["-m", "tests.functional.workers.checkpoint_worker"]


def _run(command, expect_ok=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if expect_ok:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def _batch():
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(2, 50, (4, 24), generator=generator)
    labels = torch.cat([input_ids[:, 1:], torch.zeros(4, 1, dtype=torch.long)], dim=1)
    loss_mask = torch.zeros(4, 24)
    for row, length in enumerate([23, 5, 17, 11]):
        loss_mask[row, 1:length] = 1
    return {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask}


def _saved_with_reference(tmp_path, batch, model):
    """``batch`` saved for the workers; its loss mask and ``model``'s log-probs of it (the reference)."""
    torch.save(batch, tmp_path / "batch.pt")
    with torch.no_grad():
        return batch["loss_mask"].bool(), hf_logprobs(model, batch)


def _layout_logprobs(tmp, name, hf_dir, checkpoint, nproc, tp, pp, *extra):
    out = tmp / f"{name}.pt"
    launcher = [*TORCHRUN, "--nproc-per-node", str(nproc)] if nproc > 1 else [sys.executable]
    _run([*launcher, *WORKER, "--hf-dir", str(hf_dir), "--batch", str(tmp / "batch.pt"), "--out", str(out),
          "--tp", str(tp), "--pp", str(pp), "--megatron-checkpoint", str(checkpoint), *extra])
    return torch.load(out)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_conversions_round_trip_under_any_layout(tmp_path, tied):
    original = make_tiny_qwen2(tmp_path / "hf", tied=tied)
    make_tiny_qwen2(tmp_path / "decoy", tied=tied, seed=1)  # same config, other weights: loads must not use them
    batch = _batch()
    mask, expected = _saved_with_reference(tmp_path, batch, original)

    convert("hf_to_megatron.py", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "mg_tp1"))
    tp2pp2 = _layout_logprobs(tmp_path, "tp2pp2", tmp_path / "decoy", tmp_path / "mg_tp1", 4, 2, 2,
                              "--save", str(tmp_path / "saved"), "--export", str(tmp_path / "exported"),
                              "--export-collectives", str(tmp_path / "exported_collectives"))
    assert (tp2pp2 - expected)[mask].abs().max() < 1e-5
    assert_hf_folders_bit_identical(tmp_path / "exported", tmp_path / "hf")  # HF → Megatron TP2×PP2 → HF, in job
    assert_hf_folders_bit_identical(tmp_path / "exported_collectives", tmp_path / "hf")  # the same through the GPU transport

    convert("megatron_to_hf.py", "--load", str(tmp_path / "saved"), "--out", str(tmp_path / "from_ckpt"),
             "--config", str(tmp_path / "hf"), "--no-progress")
    assert_hf_folders_bit_identical(tmp_path / "from_ckpt", tmp_path / "hf")  # checkpoint saved at TP2×PP2 → HF, offline
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "from_ckpt", dtype=torch.float32)
    with torch.no_grad():
        assert (hf_logprobs(reloaded, batch) - tp2pp2)[mask].abs().max() < 1e-5
        logits_got = reloaded(input_ids=batch["input_ids"]).logits
        logits_want = original(input_ids=batch["input_ids"]).logits
    assert torch.equal(logits_got, logits_want)

    convert("hf_to_megatron.py", "--hf-dir", str(tmp_path / "from_ckpt"), "--out", str(tmp_path / "mg_back"))
    tp1pp1 = _layout_logprobs(tmp_path, "tp1pp1", tmp_path / "decoy", tmp_path / "mg_back", 1, 1, 1)
    tp1pp2 = _layout_logprobs(tmp_path, "tp1pp2", tmp_path / "decoy", tmp_path / "mg_back", 2, 1, 2)
    for got in (tp1pp1, tp1pp2):
        assert (got - tp2pp2)[mask].abs().max() < 1e-5
        assert (got - expected)[mask].abs().max() < 1e-5


def test_moe_conversions_and_resume_under_expert_parallel_layouts(tmp_path):
    """Issue 18, Qwen3-MoE: HF → ``hf_to_megatron.py`` → actor at TP2(SP)×PP2×EP2 → in-job exports and a saved
    checkpoint → ``megatron_to_hf.py``: bit-identical; the saved checkpoint loads under EP4; a trainer
    checkpoint saved under EP2 between two optimiser steps resumes exactly (bit-identical log-probs after the
    second step), and with EP1 is refused in one line (megatron-core's optimizer state differs)."""
    original = make_tiny_qwen3(tmp_path / "hf", moe=True, num_layers=4)
    make_tiny_qwen3(tmp_path / "decoy", moe=True, num_layers=4, seed=1)  # loads must not use these weights
    batch = _training_batch(original)
    mask, expected = _saved_with_reference(tmp_path, batch, original)

    convert("hf_to_megatron.py", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "mg"))
    tp2pp2ep2 = _layout_logprobs(tmp_path, "tp2pp2ep2", tmp_path / "decoy", tmp_path / "mg", 4, 2, 2,
                                 "--ep", "2", "--etp", "1", "--sp", "--save", str(tmp_path / "saved"),
                                 "--export", str(tmp_path / "exported"),
                                 "--export-collectives", str(tmp_path / "exported_collectives"))
    assert (tp2pp2ep2 - expected)[mask].abs().max() < 1e-5
    assert_hf_folders_bit_identical(tmp_path / "exported", tmp_path / "hf")
    assert_hf_folders_bit_identical(tmp_path / "exported_collectives", tmp_path / "hf")
    convert("megatron_to_hf.py", "--load", str(tmp_path / "saved"), "--out", str(tmp_path / "from_ckpt"), "--no-progress")
    assert_hf_folders_bit_identical(tmp_path / "from_ckpt", tmp_path / "hf")  # experts saved by two EP ranks
    ep4 = _layout_logprobs(tmp_path, "ep4", tmp_path / "decoy", tmp_path / "saved", 4, 1, 1, "--ep", "4")
    assert (ep4 - expected)[mask].abs().max() < 1e-5

    ep2 = ("--ep", "2")
    two_steps = _layout_logprobs(tmp_path, "two_steps", tmp_path / "hf", tmp_path / "mg", 2, 1, 1, *ep2,
                                 "--save-between-steps", str(tmp_path / "trainer"))
    assert (two_steps - expected)[mask].abs().max() > 1e-3  # the steps changed the policy
    resumed = _layout_logprobs(tmp_path, "resumed", tmp_path / "decoy", tmp_path / "mg", 2, 1, 1, *ep2,
                               "--resume", str(tmp_path / "trainer"))
    assert torch.equal(resumed[mask], two_steps[mask])  # model, Adam moments and step, LR schedule restored
    refused = _run([sys.executable, *WORKER, "--hf-dir", str(tmp_path / "decoy"), "--batch", str(tmp_path / "batch.pt"),
                    "--out", str(tmp_path / "x.pt"), "--resume", str(tmp_path / "trainer")], expect_ok=False)
    assert refused.returncode != 0 and "parallel.expert_model_parallel_size > 1" in refused.stderr


def test_converters_refuse_a_config_of_another_model(tmp_path):
    make_tiny_qwen2(tmp_path / "hf", tied=False)
    other = make_tiny_qwen2(tmp_path / "other", tied=False)
    other.config.intermediate_size = 96
    other.config.save_pretrained(tmp_path / "other_config")
    convert("hf_to_megatron.py", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "mg"))

    result = convert("megatron_to_hf.py", "--load", str(tmp_path / "mg"), "--out", str(tmp_path / "x"),
                      "--config", str(tmp_path / "other_config"), expect_ok=False)
    assert result.returncode == 2 and "intermediate_size" in result.stderr and "different models" in result.stderr
    assert not (tmp_path / "x").exists()

    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "config.json").write_text((tmp_path / "other_config" / "config.json").read_text())
    (tmp_path / "mixed" / "model.safetensors").write_bytes((tmp_path / "hf" / "model.safetensors").read_bytes())
    result = convert("hf_to_megatron.py", "--hf-dir", str(tmp_path / "mixed"), "--out", str(tmp_path / "y"),
                      expect_ok=False)
    assert result.returncode == 2 and "intermediate_size" in result.stderr
    assert not (tmp_path / "y").exists()


def test_checkpoint_with_another_rope_base_is_refused(megatron_world, tmp_path):
    from megatron_dapo.errors import CheckpointMismatchError

    model = make_tiny_qwen2(tmp_path / "hf", tied=False)
    convert("hf_to_megatron.py", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "mg"))
    model.config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    model.save_pretrained(tmp_path / "rope10k")
    config = test_config(f"model.megatron_checkpoint={tmp_path / 'mg'}")
    with pytest.raises(CheckpointMismatchError, match="'rope_theta' is 10000.0 but checkpoint .* rope_theta=1000000.0"):
        build_actor(config, tmp_path / "rope10k")
