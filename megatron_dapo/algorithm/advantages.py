"""Group-relative advantages (GRPO/DAPO): every token of sample i gets Â_i = (R_i − mean_G R) / (std_G R + eps)."""

from __future__ import annotations

import torch


def compute_group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-group normalised rewards.

    Args:
        rewards: ``[num_groups, G]`` scalar rewards of the G samples of each prompt.
        eps: added to the standard deviation; a group with identical rewards gets advantage 0.

    Returns:
        ``[num_groups, G]`` advantages ``(R − mean) / (std + eps)``. ``std`` is the **unbiased** sample
        standard deviation (``torch.std``, divisor G − 1), as in the GRPO/DAPO reference code.
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [num_groups, G] with G >= 2, got shape {tuple(rewards.shape)}")
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    return (rewards - mean) / (std + eps)
