"""DAPO's per-micro-batch loss in Megatron's per-token contract: ``(loss_numerator, count, metric sums)``.

``dapo_loss_terms`` takes per-token log-probs from any op (autograd flows through them);
``fused_linear_dapo_loss_terms`` goes from hidden states straight to the loss with ``fused_linear_loss``.
Both use the same per-token loss, ``dapo_token_losses``. See docs/design.md, "Loss normalisation".
"""

from __future__ import annotations

import torch
from torch.distributed import ProcessGroup

from megatron_dapo.algorithm import (
    PolicyLossConfig,
    aggregate_loss_terms,
    aggregation_weights,
    clipped_pg_losses,
    kl_penalty_k3,
)
from megatron_dapo.ops.fused_linear_loss import fused_linear_loss

# Per-micro-batch sums, added over micro-batches and DP ranks after a step, then normalised (``step_loss_metrics``).
METRIC_SUM_KEYS = (
    "loss_numerator", "loss_count", "tokens", "signal_tokens", "clip_high", "clip_low", "clip_dual", "ppo_kl", "kl",
    "clip_high_prob",
)
# The step metrics of clipping: the trainer averages them over the updates after the first (ratio ≡ 1 there).
CLIP_METRIC_KEYS = ("pg_clipfrac/high", "pg_clipfrac/low", "pg_clipfrac/dual", "prob/up_clipped_mean")
# Per-token inputs of the loss besides the log-probs.
LOSS_INPUT_KEYS = ("old_logprobs", "advantages", "loss_mask", "rollout_is_weights", "ref_logprobs")


def dapo_token_losses(
    logprobs: torch.Tensor, inputs: dict[str, torch.Tensor], loss: PolicyLossConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
    """Per-token loss (clipped policy gradient, + ``kl_coef``·k3 when ``ref_logprobs`` are given), metrics, k3."""
    loss_mat, pg_metrics = clipped_pg_losses(
        logprobs,
        inputs["old_logprobs"],
        inputs["advantages"],
        inputs["loss_mask"],
        loss.clip_ratio_low,
        loss.clip_ratio_high,
        loss.clip_ratio_c,
        inputs.get("rollout_is_weights"),
    )
    kl = None
    if "ref_logprobs" in inputs:
        kl = kl_penalty_k3(logprobs, inputs["ref_logprobs"])
        loss_mat = loss_mat + loss.kl_coef * kl
    return loss_mat, pg_metrics, kl


def dapo_loss_terms(
    logprobs: torch.Tensor, micro_batch: dict[str, torch.Tensor], loss: PolicyLossConfig
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Loss numerator, its count (tokens for ``token-mean``, sequences otherwise) and metric sums.

    ``logprobs`` ``[batch, seq]`` come from the current policy; ``micro_batch`` holds ``old_logprobs``,
    ``advantages``, ``loss_mask`` and optionally ``rollout_is_weights`` and ``ref_logprobs``. Every returned
    tensor lives on ``logprobs``' device.
    """
    mask = micro_batch["loss_mask"]
    loss_mat, pg_metrics, kl = dapo_token_losses(logprobs, micro_batch, loss)
    numerator, count = aggregate_loss_terms(loss_mat, mask, loss.loss_agg_mode, loss.norm_length)
    tokens = mask.sum()
    zero = torch.zeros((), device=logprobs.device)
    clip_high = pg_metrics["pg_clipfrac/high"] * tokens
    sums = {
        "loss_numerator": numerator.detach(),
        "loss_count": count,
        "tokens": tokens,
        "signal_tokens": (mask * (micro_batch["advantages"] != 0)).sum(),
        "clip_high": clip_high,
        "clip_high_prob": pg_metrics["prob/up_clipped_mean"] * clip_high,
        "clip_low": pg_metrics["pg_clipfrac/low"] * tokens,
        "clip_dual": pg_metrics.get("pg_clipfrac/dual", zero) * tokens,
        "ppo_kl": pg_metrics["ppo_kl"] * tokens,
        "kl": zero if kl is None else (kl.detach() * mask).sum(),
    }
    return numerator, count, sums


def step_loss_metrics(total: dict[str, float]) -> dict[str, float]:
    """The loss metrics of an optimiser step from its ``METRIC_SUM_KEYS`` sums over micro-batches and DP ranks:
    token means, except ``actor/pg_loss`` (the loss itself), the clip fractions (over the tokens with non-zero
    advantage, the only ones that can clip) and ``prob/up_clipped_mean`` (a mean over the up-clipped tokens only;
    0 when none was clipped)."""
    tokens = max(total["tokens"], 1.0)
    signal_tokens = max(total["signal_tokens"], 1.0)
    return {
        "actor/pg_loss": total["loss_numerator"] / max(total["loss_count"], 1e-8),
        "actor/ppo_kl": total["ppo_kl"] / tokens,
        "actor/kl_ref": total["kl"] / tokens,
        "pg_clipfrac/high": total["clip_high"] / signal_tokens,
        "pg_clipfrac/low": total["clip_low"] / signal_tokens,
        "pg_clipfrac/dual": total["clip_dual"] / signal_tokens,
        "prob/up_clipped_mean": total["clip_high_prob"] / max(total["clip_high"], 1.0),
    }


def fused_linear_dapo_loss_terms(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    micro_batch: dict[str, torch.Tensor],
    loss: PolicyLossConfig,
    vocab_size: int,
    group: ProcessGroup | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """As ``dapo_loss_terms``, from the last hidden states ``[batch, seq, H]`` and the output weight shard."""
    weights, count = aggregation_weights(micro_batch["loss_mask"], loss.loss_agg_mode, loss.norm_length)
    flat = {k: micro_batch[k].reshape(1, -1) for k in LOSS_INPUT_KEYS if k in micro_batch}
    flat_weights = weights.reshape(1, -1)

    def chunk_loss(chunk_logprob: torch.Tensor, part: slice) -> torch.Tensor:
        loss_mat, _, _ = dapo_token_losses(chunk_logprob.unsqueeze(0), {k: v[:, part] for k, v in flat.items()}, loss)
        return (loss_mat * flat_weights[:, part]).sum()

    numerator, logprobs, _ = fused_linear_loss(
        hidden, weight_shard, micro_batch["labels"], chunk_loss, vocab_size, loss.temperature, group, chunk_size
    )
    _, _, sums = dapo_loss_terms(logprobs, micro_batch, loss)  # metrics of the same log-probs
    return numerator, count, sums
