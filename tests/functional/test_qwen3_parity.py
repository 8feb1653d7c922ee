"""Qwen3 dense and Qwen3-MoE actors against Hugging Face transformers (one process): log-probs, gradients, sync."""

import pytest
import torch

from megatron_dapo.algorithm import policy_loss
from megatron_dapo.rollout import HFRolloutEngine
from megatron_dapo.weights.hf_mapping import megatron_to_hf
from megatron_dapo.weights.sync import hf_state_dict
from megatron_dapo.weights.transfer import local_param_mappings

from ..helpers import build_actor, checkpoint_named, hf_logprobs, make_tiny_qwen3, test_config
from .test_actor_parity import _random_batch

FAMILIES = {"qwen3": {"moe": False}, "qwen3_moe": {"moe": True}, "qwen3_moe-unnormalised": {"moe": True, "norm_topk_prob": False}}


def _config(**overrides):
    base = {"parallel.micro_batch_size": 8, "optimizer.lr_warmup_steps": 0, "optimizer.clip_grad": 1e9,
            "optimizer.weight_decay": 0.0, "rollout.temperature": 1.0, "algorithm.loss_agg_mode": "token-mean"}
    base.update(overrides)
    return test_config(**base)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("loss_impl", ["naive", "fused"])
def test_logprobs_match_transformers(megatron_world, tmp_path, family, loss_impl):
    reference = make_tiny_qwen3(tmp_path, **FAMILIES[family])
    actor = build_actor(_config(**{"model.loss_impl": loss_impl}), tmp_path)
    batch = _random_batch()
    logprobs, _ = actor.compute_logprobs(batch, 0.7)
    with torch.no_grad():
        expected = hf_logprobs(reference, batch, 0.7)
    mask = batch["loss_mask"].bool()
    assert torch.allclose(logprobs[mask], expected[mask], atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("micro_batch_size", [8, 3])
def test_train_step_gradients_equal_transformers(megatron_world, tmp_path, family, micro_batch_size):
    reference = make_tiny_qwen3(tmp_path, **FAMILIES[family])
    actor = build_actor(_config(**{"parallel.micro_batch_size": micro_batch_size}), tmp_path)
    batch = _random_batch(seed=1)
    with torch.no_grad():
        old = hf_logprobs(reference, batch) + 0.3 * torch.randn(batch["labels"].shape)
    batch["old_logprobs"] = old
    metrics = actor.train_step(batch)
    loss, _ = policy_loss(hf_logprobs(reference, batch), old, batch["advantages"], batch["loss_mask"],
                          clip_ratio_c=10.0, loss_agg_mode="token-mean", norm_length=20480)
    loss.backward()
    expected = checkpoint_named({name: p.grad for name, p in reference.named_parameters()})
    got = {}
    for param, mapping in local_param_mappings(actor.model_chunks, actor.layout):
        got.update(zip(mapping.hf_names, megatron_to_hf(mapping, [param.main_grad], actor.layout)))
    assert metrics["actor/pg_loss"] == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
    assert set(got) == set(expected)
    for name, grad in expected.items():
        assert torch.allclose(got[name], grad, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe"])
def test_weight_sync_makes_the_engine_match_the_actor(megatron_world, tmp_path, family):
    make_tiny_qwen3(tmp_path, **FAMILIES[family])
    actor = build_actor(_config(**{"optimizer.lr": 0.01}), tmp_path)
    batch = _random_batch(seed=2)
    batch["old_logprobs"], _ = actor.compute_logprobs(batch, 1.0)
    actor.train_step(batch)
    engine = HFRolloutEngine.from_pretrained(str(tmp_path), pad_token_id=0, eos_token_id=1)
    actor_logprobs, _ = actor.compute_logprobs(batch, 1.0)
    mask = batch["loss_mask"].bool()
    with torch.no_grad():
        stale = hf_logprobs(engine.model, batch)
        engine.update_weights([list(hf_state_dict(actor.model_chunks, actor.layout).items())])
        synced = hf_logprobs(engine.model, batch)
    assert (stale - actor_logprobs)[mask].abs().max() > 1e-2
    assert (synced - actor_logprobs)[mask].abs().max() < 1e-4
