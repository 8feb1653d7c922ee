"""DAPO's clipped policy-gradient loss (Clip-Higher, dual clip, truncated IS) and its aggregation modes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclass(frozen=True)
class PolicyLossConfig:
    """What the per-token DAPO loss needs: clip range, dual clip, aggregation, KL weight, the sampling
    temperature (applied to the training logits exactly as the engine applied it) and the
    ``seq-mean-token-sum-norm`` length (the maximum response length)."""

    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    clip_ratio_c: float | None = 10.0
    loss_agg_mode: str = "token-mean"
    kl_coef: float = 0.0
    temperature: float = 1.0
    norm_length: int | None = None


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over positions where ``mask`` is 1 (0 when the mask is empty)."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def aggregation_weights(
    loss_mask: torch.Tensor, loss_agg_mode: str, norm_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token weights and the count such that loss = Σ weights·l / count (see ``aggregate_loss_terms``)."""
    mask = loss_mask.float()
    token_counts = mask.sum(dim=-1, keepdim=True)
    num_seqs = (token_counts > 0).float().sum()
    if loss_agg_mode == "token-mean":
        return mask, mask.sum()
    if loss_agg_mode == "seq-mean-token-sum":
        return mask, num_seqs
    if loss_agg_mode == "seq-mean-token-mean":
        return mask / token_counts.clamp(min=1), num_seqs
    if loss_agg_mode == "seq-mean-token-sum-norm":
        return mask / (norm_length if norm_length is not None else loss_mask.shape[-1]), num_seqs
    raise ValueError(f"algorithm.loss_agg_mode={loss_agg_mode!r} is not one of {LOSS_AGG_MODES}")


def aggregate_loss_terms(
    loss_mat: torch.Tensor, loss_mask: torch.Tensor, loss_agg_mode: str, norm_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split an aggregated loss into ``(numerator, count)`` so that loss = Σ numerator / Σ count over a step.

    This is the form of Megatron's per-token loss contract: numerators and counts are summed over all
    micro-batches and data-parallel ranks before the division.

    - ``token-mean``: Σ_it l·m / Σ_it m (DAPO; count = response tokens).
    - ``seq-mean-token-mean``: mean over sequences of each sequence's token mean (GRPO).
    - ``seq-mean-token-sum``: mean over sequences of each sequence's token sum.
    - ``seq-mean-token-sum-norm``: mean over sequences of token sum / ``norm_length`` (Dr. GRPO; default the
      padded response length ``loss_mat.shape[-1]``; pass the max response length to keep it constant).

    Sequences without any unmasked token do not count. Shapes: ``[batch, seq]``.
    """
    weights, count = aggregation_weights(loss_mask, loss_agg_mode, norm_length)
    return (loss_mat * weights.to(loss_mat.dtype)).sum(), count


def clipped_pg_losses(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.28,
    clip_ratio_c: float | None = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss ``max(−A·r, −A·clip(r, 1−ε_low, 1+ε_high))`` (then dual clip for A < 0) and metrics.

    Args: ``[batch, seq]`` tensors (``advantages`` may be ``[batch]``); ``rollout_is_weights`` are the truncated
    importance weights ``min(π_old/π_rollout, C)``, detached, multiplying each token's loss.

    Returns:
        ``loss_mat [batch, seq]`` and metrics: ``pg_clipfrac/high`` (A > 0 and r > 1+ε_high),
        ``pg_clipfrac/low`` (A < 0 and r < 1−ε_low), ``pg_clipfrac/dual`` (dual clip active) and ``ppo_kl``
        (mean of old − new log-prob), all masked token means; and ``prob/up_clipped_mean``, the mean
        π_θ(token) = exp(logprob) over the tokens clipped at the upper bound (those of ``pg_clipfrac/high``;
        0 when there are none) — DAPO's Figure 3a: Clip-Higher exists because these are low-probability tokens
        whose rise the upper clip would stop.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    advantages = advantages.expand_as(logprobs)
    mask = response_mask.to(logprobs.dtype)
    log_ratio = (logprobs - old_logprobs).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    loss_mat = torch.maximum(unclipped, clipped)
    up_clipped = ((advantages > 0) & (ratio > 1.0 + clip_ratio_high)).to(mask.dtype)
    metrics = {
        "pg_clipfrac/high": masked_mean(up_clipped, mask),
        "prob/up_clipped_mean": masked_mean(logprobs.detach().exp(), up_clipped * mask),
        "pg_clipfrac/low": masked_mean(((advantages < 0) & (ratio < 1.0 - clip_ratio_low)).float(), mask),
        "ppo_kl": masked_mean(-log_ratio, mask),
    }
    if clip_ratio_c is not None:
        if clip_ratio_c <= 1.0:
            raise ValueError(f"algorithm.clip_ratio_c={clip_ratio_c} must be > 1 (the reference uses 10)")
        dual_bound = -advantages * clip_ratio_c
        dual_active = (advantages < 0) & (loss_mat > dual_bound)
        metrics["pg_clipfrac/dual"] = masked_mean(dual_active.float(), mask)
        loss_mat = torch.where(advantages < 0, torch.minimum(loss_mat, dual_bound), loss_mat)
    if rollout_is_weights is not None:
        loss_mat = loss_mat * rollout_is_weights.detach()
    return loss_mat, {k: v.detach() for k, v in metrics.items()}


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.28,
    clip_ratio_c: float | None = None,
    loss_agg_mode: str = "token-mean",
    global_num_tokens: float | torch.Tensor | None = None,
    rollout_is_weights: torch.Tensor | None = None,
    norm_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DAPO policy-gradient loss of one (micro-)batch.

    ``global_num_tokens`` is the normaliser of the whole optimiser step (all micro-batches, all DP ranks):
    response tokens for ``token-mean``, sequences for the ``seq-mean-*`` modes. When given, the returned loss
    is this batch's share, so the shares of a step add up to the step's loss. When ``None``, this batch's
    own count is used.

    Returns ``(loss, metrics)``; metrics as in :func:`clipped_pg_losses` plus ``pg_loss``.
    """
    loss_mat, metrics = clipped_pg_losses(
        logprobs, old_logprobs, advantages, response_mask, clip_ratio_low, clip_ratio_high, clip_ratio_c,
        rollout_is_weights,
    )
    numerator, count = aggregate_loss_terms(loss_mat, response_mask, loss_agg_mode, norm_length)
    denominator = count if global_num_tokens is None else torch.as_tensor(global_num_tokens, dtype=numerator.dtype)
    loss = numerator / denominator.clamp(min=1e-8)
    metrics["pg_loss"] = loss.detach()
    return loss, metrics


def kl_penalty_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(π‖π_ref): ``exp(ref − logp) − (ref − logp) − 1`` (≥ 0), clamped to [0, 10]."""
    delta = (ref_logprobs - logprobs).clamp(-20.0, 20.0)
    return (torch.exp(delta) - delta - 1.0).clamp(min=0.0, max=10.0)


def truncated_is_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, cap: float = 2.0) -> torch.Tensor:
    """Truncated importance weights ``min(exp(logp_train_old − logp_rollout), cap)`` per token (docs/pitfalls.md, 2)."""
    return torch.exp((old_logprobs - rollout_logprobs).clamp(max=20.0)).clamp(max=cap)
