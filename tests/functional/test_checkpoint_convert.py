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

from ..helpers import ROOT, assert_hf_folders_bit_identical, build_actor, convert, hf_logprobs, make_tiny_qwen2, test_config

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
    torch.save(batch, tmp_path / "batch.pt")
    mask = batch["loss_mask"].bool()
    with torch.no_grad():
        expected = hf_logprobs(original, batch)

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
