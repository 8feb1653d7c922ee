"""Rollout routing replay (issue 18): an engine whose routers were perturbed chooses other experts than the actor.
Without replay the actor's routes disagree with the engine's and so do the log-probs; with replay the actor's
log-probs and gradients equal a ``transformers`` reference forced to the engine's routes."""

import pytest
import torch
import torch.nn.functional as F

from megatron_dapo.algorithm import policy_loss
from megatron_dapo.batch import build_training_batch, training_samples
from megatron_dapo.rollout import HFRolloutEngine
from megatron_dapo.rollout.base import GroupRequest
from megatron_dapo.samples import Group
from megatron_dapo.weights.hf_mapping import megatron_to_hf
from megatron_dapo.weights.transfer import local_param_mappings

from ..helpers import build_actor, checkpoint_named, hf_logprobs, make_tiny_qwen3, test_config


def _config(replay: str, micro_batch_size: int = 3):
    return test_config(**{"parallel.micro_batch_size": micro_batch_size, "optimizer.lr_warmup_steps": 0,
                          "optimizer.clip_grad": 1e9, "optimizer.weight_decay": 0.0, "rollout.temperature": 1.0,
                          "algorithm.routing_replay": replay})


def _perturbed_engine_batch(hf_dir):
    """Samples from an engine whose routers differ from the checkpoint's, as the trainer batches them."""
    engine = HFRolloutEngine.from_pretrained(str(hf_dir), pad_token_id=0, eos_token_id=1)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for router in engine._routers:
            router.weight.add_(torch.randn(router.weight.shape, generator=generator) * 0.5)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14]]
    results = engine.generate([GroupRequest(i, p, 2, 7 + i, 1.0, 1.0, 10) for i, p in enumerate(prompts)])
    groups = [Group(p, results[i], [1.0, 0.0], [1.0, -1.0]) for i, p in enumerate(prompts)]
    samples = [s for g in groups for s in training_samples(g)]
    return build_training_batch(samples, pad_token_id=0, overlong_filtering=False)


def _force_routes(reference, routes: torch.Tensor) -> None:
    """A naive reference: each HF router returns the given experts ``[b, s, layers, k]`` with its own softmax
    weights at them (renormalised, as ``norm_topk_prob``), instead of its own top-k."""
    for layer, block in enumerate(reference.model.layers):
        gate = block.mlp.gate
        indices = routes[:, :, layer].reshape(-1, routes.shape[-1]).long()  # HF flattens tokens batch-major

        def forward(hidden, gate=gate, indices=indices):
            logits = F.linear(hidden, gate.weight)
            weights = torch.softmax(logits, dim=-1, dtype=torch.float).gather(1, indices)
            weights = weights / weights.sum(-1, keepdim=True)
            return logits, weights.to(logits.dtype), indices

        gate.forward = forward


def test_without_replay_the_actor_routes_on_its_own(megatron_world, tmp_path):
    reference = make_tiny_qwen3(tmp_path, moe=True)
    batch = _perturbed_engine_batch(tmp_path)
    mask = batch["loss_mask"].bool()
    actor = build_actor(_config("off"), tmp_path)
    own, _ = actor.compute_logprobs(batch, 1.0)
    agreement = actor.routing_metrics["moe/routing_agreement"]
    with torch.no_grad():
        assert (own - hf_logprobs(reference, batch))[mask].abs().max() < 1e-5  # its own routes: plain transformers
        _force_routes(reference, batch["routed_experts"])
        forced = hf_logprobs(reference, batch)
    assert agreement < 0.9
    assert (own - forced)[mask].abs().max() > 1e-2  # the engine's routes would give other log-probs
    assert actor.routing_metrics["moe/expert_load_max_over_mean"] >= 1.0 and actor.routing_metrics["moe/aux_loss"] > 0


@pytest.mark.parametrize("micro_batch_size", [6, 2])
def test_with_replay_log_probs_and_gradients_follow_the_engines_routes(megatron_world, tmp_path, micro_batch_size):
    reference = make_tiny_qwen3(tmp_path, moe=True)
    batch = _perturbed_engine_batch(tmp_path)
    mask = batch["loss_mask"].bool()
    actor = build_actor(_config("rollout", micro_batch_size), tmp_path)
    replayed, _ = actor.compute_logprobs(batch, 1.0)
    _force_routes(reference, batch["routed_experts"])
    with torch.no_grad():
        expected = hf_logprobs(reference, batch)
    assert (replayed - expected)[mask].abs().max() < 1e-5
    assert actor.routing_metrics["moe/routing_agreement"] < 0.9  # measured from the actor's own router

    generator = torch.Generator().manual_seed(1)
    batch["advantages"] = torch.randn(batch["input_ids"].shape[0], 1, generator=generator).expand_as(mask).contiguous()
    batch["old_logprobs"] = expected.detach() + 0.3 * torch.randn(mask.shape, generator=generator)
    metrics = actor.train_step(batch)
    loss, _ = policy_loss(hf_logprobs(reference, batch), batch["old_logprobs"], batch["advantages"], batch["loss_mask"],
                          clip_ratio_c=10.0, loss_agg_mode="token-mean", norm_length=20480)
    loss.backward()
    assert metrics["actor/pg_loss"] == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
    want = checkpoint_named({name: p.grad for name, p in reference.named_parameters()})
    got = {}
    for param, mapping in local_param_mappings(actor.model_chunks, actor.layout):
        got.update(zip(mapping.hf_names, megatron_to_hf(mapping, [param.main_grad], actor.layout)))
    # transformers gives the pad token's embedding row (padding_idx 0) no gradient; the engine sampled token 0
    want["model.embed_tokens.weight"], got["model.embed_tokens.weight"] = (
        want["model.embed_tokens.weight"][1:], got["model.embed_tokens.weight"][1:])
    for name, grad in want.items():
        assert torch.allclose(got[name], grad, rtol=1e-4, atol=1e-6), name
