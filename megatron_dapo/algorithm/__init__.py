"""DAPO's algorithm as pure PyTorch functions: one named function per technique."""

from megatron_dapo.algorithm.advantages import compute_group_advantages
from megatron_dapo.algorithm.dynamic_sampling import dynamic_sampling_keep
from megatron_dapo.algorithm.overlong import overlong_filter_mask, overlong_penalty
from megatron_dapo.algorithm.policy_loss import (
    LOSS_AGG_MODES,
    PolicyLossConfig,
    aggregate_loss_terms,
    aggregation_weights,
    clipped_pg_losses,
    kl_penalty_k3,
    masked_mean,
    policy_loss,
    truncated_is_weights,
)

__all__ = [
    "LOSS_AGG_MODES",
    "PolicyLossConfig",
    "aggregate_loss_terms",
    "aggregation_weights",
    "clipped_pg_losses",
    "compute_group_advantages",
    "dynamic_sampling_keep",
    "kl_penalty_k3",
    "masked_mean",
    "overlong_filter_mask",
    "overlong_penalty",
    "policy_loss",
    "truncated_is_weights",
]
