"""DAPO's per-micro-batch loss in Megatron's per-token contract: ``(loss_numerator, count, metric sums)``."""

from __future__ import annotations

import torch

from megatron_dapo.algorithm import aggregate_loss_terms, clipped_pg_losses, kl_penalty_k3
from megatron_dapo.config import AlgorithmConfig

# Per-micro-batch sums, added over micro-batches and DP ranks after a step, then normalised.
METRIC_SUM_KEYS = ("loss_numerator", "loss_count", "tokens", "clip_high", "clip_low", "clip_dual", "ppo_kl", "kl")


def dapo_loss_terms(
    logprobs: torch.Tensor, micro_batch: dict[str, torch.Tensor], algorithm: AlgorithmConfig, norm_length: int
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Decoupled/dual-clip policy loss (+ optional k3 KL to the reference) of one micro-batch.

    ``logprobs`` ``[batch, seq]`` come from the current policy (any ``loss_impl``); ``micro_batch`` holds
    ``old_logprobs``, ``advantages``, ``loss_mask`` and optionally ``rollout_is_weights``, ``ref_logprobs``.
    Returns the loss numerator, its count (tokens for ``token-mean``, sequences otherwise) and metric sums.
    """
    mask = micro_batch["loss_mask"]
    loss_mat, pg_metrics = clipped_pg_losses(
        logprobs,
        micro_batch["old_logprobs"],
        micro_batch["advantages"],
        mask,
        algorithm.clip_ratio_low,
        algorithm.clip_ratio_high,
        algorithm.clip_ratio_c,
        micro_batch.get("rollout_is_weights"),
    )
    kl_sum = torch.zeros(())
    if "ref_logprobs" in micro_batch:
        kl = kl_penalty_k3(logprobs, micro_batch["ref_logprobs"])
        loss_mat = loss_mat + algorithm.kl_coef * kl
        kl_sum = (kl.detach() * mask).sum()
    numerator, count = aggregate_loss_terms(loss_mat, mask, algorithm.loss_agg_mode, norm_length)
    tokens = mask.sum()
    sums = {
        "loss_numerator": numerator.detach(),
        "loss_count": count,
        "tokens": tokens,
        "clip_high": pg_metrics["pg_clipfrac/high"] * tokens,
        "clip_low": pg_metrics["pg_clipfrac/low"] * tokens,
        "clip_dual": pg_metrics.get("pg_clipfrac/dual", torch.zeros(())) * tokens,
        "ppo_kl": pg_metrics["ppo_kl"] * tokens,
        "kl": kl_sum,
    }
    return numerator, count, sums
