"""Fused log-prob/entropy ops against a naive full-vocabulary PyTorch reference (single shard)."""

import pytest
import torch

from megatron_dapo.ops import fused_linear_logprobs_entropy, naive_logprobs_entropy, vocab_parallel_logprobs_entropy

VOCAB, PADDED, HIDDEN = 37, 48, 16


def reference(logits, labels, temperature):
    """Plain autograd over the real vocabulary only (the padding columns dropped)."""
    log_probs = torch.log_softmax(logits[..., :VOCAB].double() / temperature, dim=-1)
    logprob = log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logprob, entropy


def _inputs(dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 10, HIDDEN, generator=generator).to(dtype)
    weight = torch.randn(PADDED, HIDDEN, generator=generator).to(dtype)
    labels = torch.randint(0, VOCAB, (3, 10), generator=generator)
    upstream = torch.randn(3, 10, generator=generator), torch.randn(3, 10, generator=generator)
    return hidden, weight, labels, upstream


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("use_entropy_grad", [False, True])
def test_vocab_parallel_matches_reference(temperature, use_entropy_grad):
    hidden, weight, labels, (g_lp, g_h) = _inputs()
    logits = (hidden @ weight.t()).requires_grad_(True)
    ref_logits = logits.detach().clone().requires_grad_(True)
    before = logits.detach().clone()
    logprob, entropy = vocab_parallel_logprobs_entropy(logits, labels, VOCAB, temperature)
    ref_logprob, ref_entropy = reference(ref_logits, labels, temperature)
    assert torch.equal(logits.detach(), before)  # the caller's logits are not modified
    assert torch.allclose(logprob.double(), ref_logprob, atol=1e-5)
    assert torch.allclose(entropy.double(), ref_entropy, atol=1e-5)
    loss = (logprob * g_lp).sum() + ((entropy * g_h).sum() if use_entropy_grad else 0)
    ref_loss = (ref_logprob * g_lp).sum() + ((ref_entropy * g_h).sum() if use_entropy_grad else 0)
    loss.backward()
    ref_loss.backward()
    assert torch.allclose(logits.grad, ref_logits.grad.float(), atol=1e-5)
    assert logits.grad[..., VOCAB:].abs().max() == 0  # padding gets no mass, no gradient


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
@pytest.mark.parametrize("use_entropy_grad", [False, True])
def test_fused_linear_matches_reference(chunk_size, use_entropy_grad):
    hidden, weight, labels, (g_lp, g_h) = _inputs(seed=1)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    ref_hidden, ref_weight = hidden.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    logprob, entropy = fused_linear_logprobs_entropy(hidden, weight, labels, VOCAB, 0.7, chunk_size=chunk_size)
    ref_logprob, ref_entropy = reference(ref_hidden @ ref_weight.t(), labels, 0.7)
    assert logprob.shape == labels.shape
    assert torch.allclose(logprob.double(), ref_logprob, atol=1e-5)
    assert torch.allclose(entropy.double(), ref_entropy, atol=1e-5)
    ((logprob * g_lp).sum() + ((entropy * g_h).sum() if use_entropy_grad else 0)).backward()
    ((ref_logprob * g_lp).sum() + ((ref_entropy * g_h).sum() if use_entropy_grad else 0)).backward()
    assert torch.allclose(hidden.grad, ref_hidden.grad.float(), atol=1e-5)
    assert torch.allclose(weight.grad, ref_weight.grad.float(), atol=1e-5)


def test_naive_reference_path_matches_reference():
    hidden, weight, labels, _ = _inputs(seed=2)
    logprob, entropy = naive_logprobs_entropy(hidden @ weight.t(), labels, VOCAB, 0.7)
    ref_logprob, ref_entropy = reference(hidden @ weight.t(), labels, 0.7)
    assert torch.allclose(logprob.double(), ref_logprob, atol=1e-5)
    assert torch.allclose(entropy.double(), ref_entropy, atol=1e-5)


def test_bf16_inputs_within_stated_tolerance():
    """bf16 logits/weights: results are fp32 and within 2e-2 of the fp32 reference on the same (rounded) values."""
    hidden, weight, labels, (g_lp, _) = _inputs(dtype=torch.bfloat16, seed=3)
    hidden.requires_grad_(True)
    logprob, entropy = fused_linear_logprobs_entropy(hidden, weight, labels, VOCAB, 1.0, chunk_size=8)
    assert logprob.dtype == torch.float32
    ref_hidden = hidden.detach().float().requires_grad_(True)
    ref_logprob, ref_entropy = reference(ref_hidden @ weight.float().t(), labels, 1.0)
    assert torch.allclose(logprob.double(), ref_logprob, atol=2e-2, rtol=2e-2)
    assert torch.allclose(entropy.double(), ref_entropy, atol=2e-2, rtol=2e-2)
    (logprob * g_lp).sum().backward()
    (ref_logprob * g_lp).sum().backward()
    assert hidden.grad.dtype == torch.bfloat16
    assert torch.allclose(hidden.grad.float(), ref_hidden.grad.float(), atol=5e-2, rtol=5e-2)
    logits = (hidden.detach() @ weight.t()).requires_grad_(True)
    logprob, _ = vocab_parallel_logprobs_entropy(logits, labels, VOCAB, 1.0)
    assert torch.allclose(logprob.double(), ref_logprob, atol=2e-2, rtol=2e-2)


def dapo_micro_batch(labels, seed=5, with_ref=True):
    """Side inputs of the DAPO loss for ``labels [b, s]``: masks with different lengths, ratios around 1."""
    generator = torch.Generator().manual_seed(seed)
    b, s = labels.shape
    mask = torch.zeros(b, s)
    for row in range(b):
        mask[row, : 2 + 3 * row] = 1
    batch = {
        "labels": labels,
        "loss_mask": mask,
        "old_logprobs": -3.0 + 0.5 * torch.randn(b, s, generator=generator),
        "advantages": torch.randn(b, 1, generator=generator).expand(b, s).contiguous(),
        "rollout_is_weights": torch.rand(b, s, generator=generator) + 0.5,
    }
    if with_ref:
        batch["ref_logprobs"] = -3.0 + 0.5 * torch.randn(b, s, generator=generator)
    return batch


def naive_dapo_loss(hidden, weight, batch, algorithm, temperature):
    from megatron_dapo.ops.dapo_loss import dapo_loss_terms

    logprobs, _ = naive_logprobs_entropy(hidden @ weight.t(), batch["labels"], VOCAB, temperature)
    return dapo_loss_terms(logprobs, batch, algorithm, norm_length=16)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("chunk_size", [4, 1024])
def test_fused_linear_dapo_loss_matches_naive(mode, chunk_size):
    from megatron_dapo.config import AlgorithmConfig
    from megatron_dapo.ops.dapo_loss import fused_linear_dapo_loss_terms

    algorithm = AlgorithmConfig(loss_agg_mode=mode, clip_ratio_c=3.0, kl_coef=0.1)
    hidden, weight, labels, _ = _inputs(seed=6)
    batch = dapo_micro_batch(labels)
    ref_hidden, ref_weight = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref_numerator, ref_count, ref_sums = naive_dapo_loss(ref_hidden, ref_weight, batch, algorithm, 0.7)
    ref_numerator.backward()
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    numerator, count, sums = fused_linear_dapo_loss_terms(hidden, weight, batch, algorithm, 16, VOCAB, 0.7, None, chunk_size)
    (2.0 * numerator).backward()  # the upstream scale reaches the saved gradients
    assert numerator.item() == pytest.approx(ref_numerator.item(), rel=1e-5, abs=1e-6)
    assert count.item() == ref_count.item()
    for key in ref_sums:
        assert sums[key].item() == pytest.approx(ref_sums[key].item(), rel=1e-5, abs=1e-6), key
    assert torch.allclose(hidden.grad, 2.0 * ref_hidden.grad, atol=1e-5)
    assert torch.allclose(weight.grad, 2.0 * ref_weight.grad, atol=1e-5)
