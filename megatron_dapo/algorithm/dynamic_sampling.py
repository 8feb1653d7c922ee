"""Dynamic sampling: keep only groups whose raw accuracy lies strictly between 0 and 1."""

from __future__ import annotations

import torch


def dynamic_sampling_keep(acc: torch.Tensor) -> torch.Tensor:
    """Which groups carry a learning signal.

    Args:
        acc: ``[num_groups, G]`` raw correctness (0/1 or bool) — never the shaped reward (docs/pitfalls.md, 4).

    Returns:
        bool ``[num_groups]``, True where ``0 < #correct < G``.
    """
    acc = torch.as_tensor(acc)
    if acc.dim() != 2:
        raise ValueError(f"acc must be [num_groups, G], got shape {tuple(acc.shape)}")
    num_correct = (acc > 0).sum(dim=1)
    return (num_correct > 0) & (num_correct < acc.shape[1])
