"""Turn scored groups into the actor's training tensors (label coordinates, ``[num_samples, seq]``)."""

from __future__ import annotations

import torch

from megatron_dapo.algorithm import compute_group_advantages, overlong_filter_mask
from megatron_dapo.rollout.collect import Group


def build_training_batch(groups: list[Group], pad_token_id: int, overlong_filtering: bool) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response sequences with per-token targets, masks, rollout log-probs, advantages.

    Position t holds the prediction of token t+1: ``labels[t] = input_ids[t+1]``; ``loss_mask[t]`` is 1 where
    that label is a response token (prompt and padding are 0; truncated samples are 0 everywhere when
    ``overlong_filtering``). ``advantages`` are group-normalised shaped rewards, the same for every token.
    """
    samples = [(g.prompt_ids, s) for g in groups for s in g.samples]
    width = max(len(p) + len(s.token_ids) for p, s in samples)
    num = len(samples)
    input_ids = torch.full((num, width), pad_token_id, dtype=torch.long)
    loss_mask = torch.zeros(num, width)
    rollout_logprobs = torch.zeros(num, width)
    for row, (prompt_ids, sample) in enumerate(samples):
        sequence = prompt_ids + sample.token_ids
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        start, end = len(prompt_ids) - 1, len(sequence) - 1  # label positions of the response tokens
        loss_mask[row, start:end] = 1.0
        rollout_logprobs[row, start:end] = torch.tensor(sample.logprobs)
    labels = torch.cat([input_ids[:, 1:], torch.full((num, 1), pad_token_id, dtype=torch.long)], dim=1)
    if overlong_filtering:
        loss_mask *= overlong_filter_mask([s.finish_reason for _, s in samples]).unsqueeze(1)
    advantages = compute_group_advantages(torch.tensor([g.rewards for g in groups])).reshape(num, 1)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "loss_mask": loss_mask,
        "rollout_logprobs": rollout_logprobs,
        "advantages": advantages.expand(num, width).contiguous(),
    }


def split_batch(batch: dict[str, torch.Tensor], chunk_size: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive chunks of ``chunk_size`` samples (mini-batches for optimiser steps, micro-batches)."""
    size = next(iter(batch.values())).shape[0]
    return [{k: v[i : i + chunk_size] for k, v in batch.items()} for i in range(0, size, chunk_size)]
