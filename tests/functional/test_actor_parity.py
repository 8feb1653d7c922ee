"""The Megatron actor against Hugging Face transformers: log-probs, token-mean gradients, weight sync."""

import pytest
import torch

from megatron_dapo.algorithm import policy_loss
from megatron_dapo.batch import build_training_batch, training_samples
from megatron_dapo.errors import CheckpointMismatchError, NonFiniteWeightsError
from megatron_dapo.rollout import HFRolloutEngine
from megatron_dapo.rollout.base import GroupRequest
from megatron_dapo.samples import Group
from megatron_dapo.weights.hf_mapping import megatron_to_hf
from megatron_dapo.weights.sync import hf_state_dict
from megatron_dapo.weights.transfer import local_param_mappings, unwrap

from ..helpers import build_actor, hf_logprobs, make_tiny_qwen2, test_config


def _config(**overrides):
    base = {"parallel.micro_batch_size": 8, "optimizer.lr_warmup_steps": 0, "optimizer.clip_grad": 1e9,
            "optimizer.weight_decay": 0.0, "rollout.temperature": 1.0, "algorithm.loss_agg_mode": "token-mean"}
    base.update(overrides)
    return test_config(**base)


def _random_batch(seed=0, num=8, width=20, vocab=50):
    """Sequences of different prompt/response lengths in label coordinates."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, vocab, (num, width), generator=generator)
    loss_mask = torch.zeros(num, width)
    for row in range(num):
        prompt = 2 + row % 3
        response = [1, 17, 3, 12, 5, 9, 2, 15][row]
        loss_mask[row, prompt - 1 : prompt - 1 + response] = 1
        input_ids[row, prompt + response :] = 0
    labels = torch.cat([input_ids[:, 1:], torch.zeros(num, 1, dtype=torch.long)], dim=1)
    advantages = torch.randn(num, 1, generator=generator).expand(num, width).contiguous()
    return {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask, "advantages": advantages}


LOSS_IMPLS = ["naive", "fused", "fused_linear"]


@pytest.mark.parametrize("loss_impl", LOSS_IMPLS)
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_transformers(megatron_world, tmp_path, tied, temperature, loss_impl):
    reference = make_tiny_qwen2(tmp_path, tied)
    actor = build_actor(_config(**{"model.loss_impl": loss_impl}), str(tmp_path))
    batch = _random_batch()
    logprobs, entropy = actor.compute_logprobs(batch, temperature)
    with torch.no_grad():
        expected = hf_logprobs(reference, batch, temperature)
        probs = torch.softmax(reference(input_ids=batch["input_ids"]).logits / temperature, -1)
        expected_entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
    mask = batch["loss_mask"].bool()
    assert torch.allclose(logprobs[mask], expected[mask], atol=1e-5)
    assert torch.allclose(entropy[mask], expected_entropy[mask], atol=1e-4)


def _megatron_grads_by_hf_name(actor):
    grads = {}
    for param, mapping in local_param_mappings(actor.model_chunks, actor.layout):
        if mapping.megatron_name == "output_layer.weight" and actor.layout.tie_word_embeddings:
            continue
        for name, grad in zip(mapping.hf_names, megatron_to_hf(mapping, [param.main_grad], actor.layout)):
            grads[name] = grad
    return grads


@pytest.mark.parametrize("loss_impl", LOSS_IMPLS)
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("micro_batch_size", [8, 2, 1])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_train_step_gradients_equal_full_batch_reference(megatron_world, tmp_path, micro_batch_size, mode, tied, loss_impl):
    """docs/pitfalls.md, 1: any micro-batch split gives the single-batch gradient of the step's loss, for every loss op."""
    reference = make_tiny_qwen2(tmp_path, tied=tied)
    overrides = {"parallel.micro_batch_size": micro_batch_size, "algorithm.loss_agg_mode": mode, "model.loss_impl": loss_impl}
    actor = build_actor(_config(**overrides), str(tmp_path))
    batch = _random_batch(seed=1)
    with torch.no_grad():
        old = hf_logprobs(reference, batch, 1.0) + 0.3 * torch.randn(batch["labels"].shape)  # ratios != 1
    batch["old_logprobs"] = old
    metrics = actor.train_step(batch)

    logprobs = hf_logprobs(reference, batch, 1.0)
    loss, _ = policy_loss(logprobs, old, batch["advantages"], batch["loss_mask"], clip_ratio_c=10.0,
                          loss_agg_mode=mode, norm_length=20480)
    loss.backward()
    expected = {name: p.grad for name, p in reference.named_parameters()}
    got = _megatron_grads_by_hf_name(actor)
    assert metrics["actor/pg_loss"] == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
    expected_norm = torch.sqrt(sum(g.pow(2).sum() for g in expected.values())).item()
    assert metrics["actor/grad_norm"] == pytest.approx(expected_norm, rel=1e-5)
    for name, grad in expected.items():
        assert torch.allclose(got[name], grad, rtol=1e-4, atol=1e-6), name


def test_weight_sync_makes_engine_match_actor(megatron_world, tmp_path):
    make_tiny_qwen2(tmp_path, tied=False)
    actor = build_actor(_config(**{"optimizer.lr": 0.01}), str(tmp_path))
    batch = _random_batch(seed=2)
    batch["old_logprobs"], _ = actor.compute_logprobs(batch, 1.0)
    actor.train_step(batch)  # weights move
    engine = HFRolloutEngine.from_pretrained(str(tmp_path), pad_token_id=0, eos_token_id=1)
    actor_logprobs, _ = actor.compute_logprobs(batch, 1.0)
    mask = batch["loss_mask"].bool()
    with torch.no_grad():
        stale = hf_logprobs(engine.model, batch, 1.0)
        engine.update_weights([list(hf_state_dict(actor.model_chunks, actor.layout).items())])
        synced = hf_logprobs(engine.model, batch, 1.0)
    assert (stale - actor_logprobs)[mask].abs().max() > 1e-2  # the step changed the policy
    assert (synced - actor_logprobs)[mask].abs().max() < 1e-4


@pytest.mark.parametrize("top_p", [1.0, 0.5])
def test_engine_sampling_logprobs_match_actor_at_temperature(megatron_world, tmp_path, top_p):
    """The engine's reported log-probs are the actor's at the same temperature (docs/pitfalls.md, 3), through the
    trainer's own batch building (left-padded prompts in the engine, right-padded sequences in the batch); with
    top-p < 1 they are still those of the full distribution, as SGLang reports them (not renormalised)."""
    make_tiny_qwen2(tmp_path, tied=True)
    actor = build_actor(_config(), str(tmp_path))
    engine = HFRolloutEngine.from_pretrained(str(tmp_path), pad_token_id=0, eos_token_id=1)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]
    results = engine.generate([GroupRequest(i, prompt, 2, 3 + i, 0.7, top_p, 6) for i, prompt in enumerate(prompts)])
    samples = [s for i in range(len(prompts)) for s in results[i]]
    groups = [Group(prompt, results[i], [1.0, 0.0], [1.0, -1.0]) for i, prompt in enumerate(prompts)]
    batch = build_training_batch([s for g in groups for s in training_samples(g)], pad_token_id=0, overlong_filtering=False)
    logprobs, _ = actor.compute_logprobs(batch, 0.7)
    mask = batch["loss_mask"].bool()
    assert all(max(s.token_ids) < 50 for s in samples)
    assert mask.sum() == sum(len(s.token_ids) for s in samples)
    assert (logprobs - batch["rollout_logprobs"])[mask].abs().max() < 1e-4


def test_checkpoint_of_another_model_is_refused(megatron_world, tmp_path):
    import shutil

    make_tiny_qwen2(tmp_path / "small", tied=False)
    other = make_tiny_qwen2(tmp_path / "other", tied=False)
    other.config.intermediate_size = 96  # config of a different model beside the small one's weights
    other.config.save_pretrained(tmp_path / "mixed")
    shutil.copy(tmp_path / "small" / "model.safetensors", tmp_path / "mixed" / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match="different models"):
        build_actor(_config(), str(tmp_path / "mixed"))


def test_config_with_another_vocab_size_is_refused_naming_the_field(megatron_world, tmp_path):
    model = make_tiny_qwen2(tmp_path, tied=False)
    model.config.vocab_size = 64  # the weights have 50 rows
    model.config.save_pretrained(tmp_path)
    with pytest.raises(CheckpointMismatchError, match="'vocab_size' is 64 but model.embed_tokens.weight has 50 rows"):
        build_actor(_config(), str(tmp_path))


def test_weights_with_nan_or_inf_are_refused_naming_the_tensor(megatron_world, tmp_path):
    """An HF folder, then a checkpoint, with one non-finite value: refused, naming the tensor (not NaN losses)."""
    from safetensors.torch import load_file, save_file

    make_tiny_qwen2(tmp_path / "hf", tied=False)
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(NonFiniteWeightsError, match=r"tensor decoder\.layers\.1\.mlp\.linear_fc2\.weight \(HF "
                       r"model\.layers\.1\.mlp\.down_proj\.weight\) holds NaN or Inf"):
        build_actor(_config(), str(tmp_path / "hf"))

    make_tiny_qwen2(tmp_path / "clean", tied=False)
    actor = build_actor(_config(), str(tmp_path / "clean"))
    batch = _random_batch(seed=1)
    actor.train_step({**batch, "old_logprobs": actor.compute_logprobs(batch, 1.0)[0]})  # Adam state to save
    weight = dict(unwrap(actor.model_chunks[0]).named_parameters())["decoder.final_layernorm.weight"]
    clean = weight.detach().clone()
    with torch.no_grad():
        weight[0] = float("inf")
    actor.save_checkpoint(tmp_path / "checkpoints", 1, {"step": 1}, None)
    with torch.no_grad():
        weight.copy_(clean)
    with pytest.raises(NonFiniteWeightsError, match=r"tensor decoder\.final_layernorm\.weight \(HF model\.norm\.weight\)"):
        actor.load_checkpoint(tmp_path / "checkpoints")


@pytest.mark.parametrize("loss_impl", LOSS_IMPLS)
def test_bf16_training_matches_the_fp32_reference_within_bf16_tolerance(megatron_world, tmp_path, loss_impl):
    """``model.bf16``: bf16 weights and activations, fp32 main params and grads: log-probs and the step's
    gradients stay within bf16 rounding of the fp32 ``transformers`` reference, and the optimizer's fp32 main
    parameters, not the bf16 copies, are what Adam updates."""
    reference = make_tiny_qwen2(tmp_path, tied=False)
    actor = build_actor(_config(**{"model.bf16": True, "model.loss_impl": loss_impl, "optimizer.lr": 1e-3}), tmp_path)
    assert all(p.dtype == torch.bfloat16 for chunk in actor.model_chunks for p in chunk.parameters())
    batch = _random_batch(seed=4)
    logprobs, _ = actor.compute_logprobs(batch, 1.0)
    mask = batch["loss_mask"].bool()
    with torch.no_grad():
        expected = hf_logprobs(reference, batch)
    assert logprobs.dtype == torch.float32
    assert (logprobs - expected)[mask].abs().mean() < 0.01  # measured 0.0025
    # π_old = each side's own log-probs (ratio 1, as at a step's first update): what differs is bf16 rounding,
    # not which tokens a clip boundary catches.
    actor.forward_backward({**batch, "old_logprobs": logprobs})
    reference_logprobs = hf_logprobs(reference, batch)
    loss, _ = policy_loss(reference_logprobs, reference_logprobs.detach(), batch["advantages"], batch["loss_mask"],
                          clip_ratio_c=10.0, loss_agg_mode="token-mean")
    loss.backward()
    got = _megatron_grads_by_hf_name(actor)
    assert all(g.dtype == torch.float32 for g in got.values())  # main_grad: accumulated in fp32
    total_error = sum((got[name] - p.grad).norm() ** 2 for name, p in reference.named_parameters()) ** 0.5
    total_norm = sum(p.grad.norm() ** 2 for p in reference.parameters()) ** 0.5
    assert total_error / total_norm < 0.02, (total_error / total_norm).item()  # measured 0.008
