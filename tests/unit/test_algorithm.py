"""DAPO's formulas (dapo.md) against hand-computed numbers."""

import math

import pytest
import torch

from megatron_dapo.algorithm import (
    aggregate_loss_terms,
    compute_group_advantages,
    dynamic_sampling_keep,
    kl_penalty_k3,
    overlong_filter_mask,
    overlong_penalty,
    policy_loss,
    truncated_is_weights,
)


def test_group_advantages_hand_computed():
    # mean 0, unbiased std sqrt(4/3) -> ±sqrt(3)/2
    adv = compute_group_advantages(torch.tensor([[1.0, -1.0, -1.0, 1.0], [1.0, 1.0, 1.0, -1.0]]))
    assert torch.allclose(adv[0], torch.tensor([0.8660254, -0.8660254, -0.8660254, 0.8660254]), atol=1e-5)
    # group 2: mean 0.5, unbiased std 1.0 -> [0.5, 0.5, 0.5, -1.5]
    assert torch.allclose(adv[1], torch.tensor([0.5, 0.5, 0.5, -1.5]), atol=1e-5)


def test_group_advantages_constant_group_is_zero_and_g1_refused():
    assert torch.equal(compute_group_advantages(torch.full((2, 3), 0.7)), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="G >= 2"):
        compute_group_advantages(torch.ones(3, 1))


def test_dynamic_sampling_keeps_only_mixed_groups():
    acc = torch.tensor([[1, 1, 1], [0, 0, 0], [1, 0, 0], [0, 1, 1]])
    assert dynamic_sampling_keep(acc).tolist() == [False, False, True, True]
    assert dynamic_sampling_keep(acc.bool()).tolist() == [False, False, True, True]


def test_overlong_penalty_paper_numbers():
    # L_max 20480, L_cache 4096 -> expected 16384
    lengths = torch.tensor([100, 16384, 16385, 18432, 20480, 20481])
    penalty = overlong_penalty(lengths, 20480, 4096)
    expected = torch.tensor([0.0, 0.0, -1 / 4096, -0.5, -1.0, -1.0])
    assert torch.allclose(penalty, expected, atol=1e-7)
    assert torch.allclose(overlong_penalty(lengths, 20480, 4096, penalty_factor=0.5), expected * 0.5, atol=1e-7)


def test_overlong_penalty_rejects_bad_buffer():
    with pytest.raises(ValueError, match="overlong_buffer_len"):
        overlong_penalty(torch.tensor([1]), 10, 20)


def test_overlong_filter_masks_truncated():
    assert overlong_filter_mask(["stop", "length", "stop"]).tolist() == [1.0, 0.0, 1.0]


def _logprobs_with_ratios(ratios):
    old = torch.full((1, len(ratios)), -1.0)
    return old + torch.log(torch.tensor([ratios])), old


def test_clip_higher_positive_advantage():
    logprobs, old = _logprobs_with_ratios([1.5, 0.5, 1.0])
    loss, metrics = policy_loss(logprobs, old, torch.tensor([1.0]), torch.ones(1, 3))
    # token losses: max(-1.5, -1.28) = -1.28 (clipped at 1+0.28), -0.5, -1.0
    assert loss.item() == pytest.approx((-1.28 - 0.5 - 1.0) / 3, abs=1e-6)
    assert metrics["pg_clipfrac/high"].item() == pytest.approx(1 / 3)
    assert metrics["pg_clipfrac/low"].item() == 0.0


def test_up_clipped_probability_is_the_mean_pi_of_tokens_clipped_at_the_upper_bound():
    logprobs, old = _logprobs_with_ratios([1.5, 0.5, 1.0, 1.4, 2.0])
    logprobs, old = torch.cat([logprobs, logprobs]), torch.cat([old, old])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    _, metrics = policy_loss(logprobs, old, torch.tensor([1.0, -1.0]), mask)
    # up-clipped: A > 0 and ratio > 1.28 -> ratios 1.5 and 1.4 of row 0 (its 2.0 is masked, row 1 has A < 0);
    # π = exp(logprob) = ratio · e^-1
    assert metrics["prob/up_clipped_mean"].item() == pytest.approx((1.5 + 1.4) / 2 * math.exp(-1.0), rel=1e-6)
    _, metrics = policy_loss(logprobs, old, torch.tensor([-1.0, -1.0]), mask)
    assert metrics["prob/up_clipped_mean"].item() == 0.0  # no token clipped at the upper bound


def test_clip_lower_negative_advantage_and_dual_clip():
    logprobs, old = _logprobs_with_ratios([1.5, 0.5, 1.0, 5.0])
    loss, metrics = policy_loss(logprobs, old, torch.tensor([-1.0]), torch.ones(1, 4), clip_ratio_c=3.0)
    # max(1.5, 1.28)=1.5; max(0.5, 0.8)=0.8 (clipped at 1-0.2); 1.0; max(5, 1.28)=5 -> dual clip min(5, 3)=3
    assert loss.item() == pytest.approx((1.5 + 0.8 + 1.0 + 3.0) / 4, abs=1e-6)
    assert metrics["pg_clipfrac/low"].item() == pytest.approx(1 / 4)
    assert metrics["pg_clipfrac/dual"].item() == pytest.approx(1 / 4)


def test_dual_clip_refuses_c_not_above_one():
    logprobs, old = _logprobs_with_ratios([1.0])
    with pytest.raises(ValueError, match="clip_ratio_c"):
        policy_loss(logprobs, old, torch.tensor([-1.0]), torch.ones(1, 1), clip_ratio_c=1.0)


def test_gradient_is_zero_where_clipped_and_minus_a_ratio_over_n_elsewhere():
    logprobs, old = _logprobs_with_ratios([1.5, 1.1])
    logprobs.requires_grad_(True)
    loss, _ = policy_loss(logprobs, old, torch.tensor([2.0]), torch.ones(1, 2))
    loss.backward()
    # d/dlogp of -A*ratio/N = -A*ratio/N for the unclipped token; 0 for the clipped one
    assert logprobs.grad[0, 0].item() == 0.0
    assert logprobs.grad[0, 1].item() == pytest.approx(-2.0 * 1.1 / 2, rel=1e-5)


LOSS_MAT = torch.tensor([[1.0, 2.0, 3.0, 7.0], [4.0, 9.0, 9.0, 9.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token-mean", (1 + 2 + 3 + 4) / 4),
        ("seq-mean-token-mean", (2.0 + 4.0) / 2),
        ("seq-mean-token-sum", (6.0 + 4.0) / 2),
        ("seq-mean-token-sum-norm", (6.0 / 4 + 4.0 / 4) / 2),
    ],
)
def test_aggregation_modes(mode, expected):
    numerator, count = aggregate_loss_terms(LOSS_MAT, MASK, mode)
    assert (numerator / count).item() == pytest.approx(expected)


def test_unknown_aggregation_mode_names_the_key():
    with pytest.raises(ValueError, match="loss_agg_mode"):
        aggregate_loss_terms(LOSS_MAT, MASK, "sequence-mean")


def test_global_token_mean_over_micro_batches_equals_full_batch():
    """docs/pitfalls.md, 1: per-micro-batch shares with the step's token count add up to the full-batch loss/grad."""
    torch.manual_seed(0)
    logprobs = (torch.randn(6, 10) * 0.1 - 1.0).requires_grad_(True)
    old = logprobs.detach() + torch.randn(6, 10) * 0.2
    adv = torch.randn(6)
    mask = torch.zeros(6, 10)
    for row, length in enumerate([1, 10, 3, 7, 2, 9]):  # very different lengths
        mask[row, :length] = 1
    full, _ = policy_loss(logprobs, old, adv, mask)
    full_grad = torch.autograd.grad(full, logprobs)[0]
    total = mask.sum()
    shares = [policy_loss(logprobs[i : i + 2], old[i : i + 2], adv[i : i + 2], mask[i : i + 2], global_num_tokens=total)[0] for i in (0, 2, 4)]
    split_grad = torch.autograd.grad(sum(shares), logprobs)[0]
    assert sum(shares).item() == pytest.approx(full.item(), rel=1e-6)
    assert torch.allclose(split_grad, full_grad, atol=1e-7)
    # the naive mean of per-micro-batch means differs for these lengths
    naive = sum(policy_loss(logprobs[i : i + 2], old[i : i + 2], adv[i : i + 2], mask[i : i + 2])[0] for i in (0, 2, 4)) / 3
    assert abs(naive.item() - full.item()) > 1e-3


def test_rollout_is_weights_scale_token_losses():
    logprobs, old = _logprobs_with_ratios([1.0, 1.0])
    weights = torch.tensor([[0.5, 2.0]])
    loss, _ = policy_loss(logprobs, old, torch.tensor([1.0]), torch.ones(1, 2), rollout_is_weights=weights)
    assert loss.item() == pytest.approx((-0.5 - 2.0) / 2)


def test_truncated_is_weights_and_k3():
    w = truncated_is_weights(torch.tensor([-0.5, -0.1]), torch.tensor([-0.6, -2.0]))
    assert w.tolist() == pytest.approx([math.exp(0.1), 2.0], rel=1e-6)
    kl = kl_penalty_k3(torch.tensor([-1.0, -1.0]), torch.tensor([-2.0, -1.0]))
    assert kl.tolist() == pytest.approx([math.exp(-1) + 1 - 1, 0.0], abs=1e-6)
