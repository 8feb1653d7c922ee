"""Fused log-prob/entropy ops against a naive full-vocabulary PyTorch reference (single shard)."""

import pytest
import torch

from megatron_dapo.algorithm import PolicyLossConfig
from megatron_dapo.ops import fused_linear_logprobs_entropy, naive_logprobs_entropy, vocab_parallel_logprobs_entropy

from ..helpers import VOCAB, dapo_micro_batch, loss_op_inputs, naive_dapo_loss
from ..helpers import reference_logprobs_entropy as reference


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("use_entropy_grad", [False, True])
def test_vocab_parallel_matches_reference(temperature, use_entropy_grad):
    hidden, weight, labels, (g_lp, g_h) = loss_op_inputs()
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
    hidden, weight, labels, (g_lp, g_h) = loss_op_inputs(seed=1)
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
    hidden, weight, labels, _ = loss_op_inputs(seed=2)
    logprob, entropy = naive_logprobs_entropy(hidden @ weight.t(), labels, VOCAB, 0.7)
    ref_logprob, ref_entropy = reference(hidden @ weight.t(), labels, 0.7)
    assert torch.allclose(logprob.double(), ref_logprob, atol=1e-5)
    assert torch.allclose(entropy.double(), ref_entropy, atol=1e-5)


def test_bf16_inputs_within_stated_tolerance():
    """bf16 logits/weights: results are fp32 and within 2e-2 of the fp32 reference on the same (rounded) values."""
    hidden, weight, labels, (g_lp, _) = loss_op_inputs(dtype=torch.bfloat16, seed=3)
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


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("chunk_size", [4, 1024])
def test_fused_linear_dapo_loss_matches_naive(mode, chunk_size):
    from megatron_dapo.ops.dapo_loss import fused_linear_dapo_loss_terms

    loss = PolicyLossConfig(loss_agg_mode=mode, clip_ratio_c=3.0, kl_coef=0.1, temperature=0.7, norm_length=16)
    hidden, weight, labels, _ = loss_op_inputs(seed=6)
    batch = dapo_micro_batch(labels)
    ref_hidden, ref_weight = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref_numerator, ref_count, ref_sums = naive_dapo_loss(ref_hidden, ref_weight, batch, loss)
    ref_numerator.backward()
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    numerator, count, sums = fused_linear_dapo_loss_terms(hidden, weight, batch, loss, VOCAB, None, chunk_size)
    (2.0 * numerator).backward()  # the upstream scale reaches the saved gradients
    assert numerator.item() == pytest.approx(ref_numerator.item(), rel=1e-5, abs=1e-6)
    assert count.item() == ref_count.item()
    for key in ref_sums:
        assert sums[key].item() == pytest.approx(ref_sums[key].item(), rel=1e-5, abs=1e-6), key
    assert torch.allclose(hidden.grad, 2.0 * ref_hidden.grad, atol=1e-5)
    assert torch.allclose(weight.grad, 2.0 * ref_weight.grad, atol=1e-5)


@pytest.mark.parametrize("impl", ["naive", "fused", "fused_linear"])
def test_up_clipped_probability_and_clip_fractions_of_each_loss_impl(impl):
    """``prob/up_clipped_mean`` of each ``model.loss_impl`` over two micro-batches, as the actor reduces it, equals
    Σ π / count over the up-clipped tokens computed with plain ``log_softmax``; the clip fractions are shares of
    the tokens with a non-zero advantage."""
    from megatron_dapo.actor.actor import metric_sums
    from megatron_dapo.ops.dapo_loss import METRIC_SUM_KEYS, dapo_loss_terms, fused_linear_dapo_loss_terms, step_loss_metrics

    loss = PolicyLossConfig(clip_ratio_high=0.1, temperature=0.7)
    hidden, weight, labels, _ = loss_op_inputs(seed=7)
    ref_logprob, _ = reference(hidden @ weight.t(), labels, 0.7)
    batch = dapo_micro_batch(labels, with_ref=False)
    ratio = torch.tensor([1.5, 0.7]).repeat(labels.shape[1] // 2)  # 1.5 > 1 + 0.1 on even positions, 0.7 < 1 − 0.2
    batch["old_logprobs"] = (ref_logprob - ratio.log()).float()

    def step_metrics(advantages: list[float]) -> dict[str, float]:
        batch["advantages"] = torch.tensor(advantages).unsqueeze(1).expand_as(labels).contiguous()
        outputs = []
        for rows in (slice(0, 2), slice(2, 3)):
            micro = {k: v[rows] for k, v in batch.items()}
            if impl == "fused_linear":
                outputs.append(fused_linear_dapo_loss_terms(hidden[rows], weight, micro, loss, VOCAB, None, 4)[2])
                continue
            op = naive_logprobs_entropy if impl == "naive" else vocab_parallel_logprobs_entropy
            logprobs, _ = op(hidden[rows] @ weight.t(), labels[rows], VOCAB, 0.7)
            outputs.append(dapo_loss_terms(logprobs, micro, loss)[2])
        total = dict(zip(METRIC_SUM_KEYS, metric_sums(outputs, torch.device("cpu")).tolist()))
        return step_loss_metrics(total)

    mask = batch["loss_mask"] > 0
    up = mask & (ratio > 1.1) & torch.tensor([[True], [False], [True]])  # rows with A > 0
    expected = ref_logprob.exp()[up].sum().item() / up.sum().item()
    assert up.sum() == 1 + 4  # rows 0 and 2: 2 and 8 response tokens, every other one up-clipped
    assert step_metrics([1.0, -1.0, 0.5])["prob/up_clipped_mean"] == pytest.approx(expected, rel=1e-5)
    assert step_metrics([-1.0, -1.0, -0.5])["prob/up_clipped_mean"] == 0.0  # none clipped at the upper bound
    # clip fractions count the tokens that can clip: those with a non-zero advantage (row 1's A = 0 here)
    with_signal = step_metrics([1.0, 0.0, -0.5])
    signal_tokens = mask[[0, 2]].sum().item()
    up_row_0, low_row_2 = (mask & (ratio > 1.1))[0].sum().item(), (mask & (ratio < 0.8))[2].sum().item()
    assert (up_row_0, low_row_2) == (1, 4)
    assert with_signal["pg_clipfrac/high"] == pytest.approx(up_row_0 / signal_tokens)
    assert with_signal["pg_clipfrac/low"] == pytest.approx(low_row_2 / signal_tokens)
