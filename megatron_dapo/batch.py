"""Turn scored groups into the actor's training tensors (label coordinates, ``[num_samples, seq]``)."""

from __future__ import annotations

import torch

from megatron_dapo.algorithm import compute_group_advantages, overlong_filter_mask
from megatron_dapo.samples import Group, TrainingSample


def training_samples(group: Group) -> list[TrainingSample]:
    """A scored group's samples with their group-normalised advantages (of the shaped rewards)."""
    advantages = compute_group_advantages(torch.tensor([group.rewards]))[0].tolist()
    return [
        TrainingSample(group.prompt_ids, sample.token_ids, sample.logprobs, advantage, sample.finish_reason == "length",
                       sample.routed_experts)
        for sample, advantage in zip(group.samples, advantages)
    ]


def build_training_batch(
    samples: list[TrainingSample], pad_token_id: int, overlong_filtering: bool
) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response sequences with per-token targets, masks, rollout log-probs, advantages.

    Position t holds the prediction of token t+1: ``labels[t] = input_ids[t+1]``; ``loss_mask[t]`` is 1 where
    that label is a response token (prompt and padding are 0; truncated samples are 0 everywhere when
    ``overlong_filtering``). ``advantages`` are the same for every token of a sample.
    """
    width = max(len(s.prompt_ids) + len(s.token_ids) for s in samples)
    num = len(samples)
    input_ids = torch.full((num, width), pad_token_id, dtype=torch.long)
    loss_mask = torch.zeros(num, width)
    rollout_logprobs = torch.zeros(num, width)
    for row, sample in enumerate(samples):
        sequence = sample.prompt_ids + sample.token_ids
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        start, end = len(sample.prompt_ids) - 1, len(sequence) - 1  # label positions of the response tokens
        loss_mask[row, start:end] = 1.0
        rollout_logprobs[row, start:end] = torch.tensor(sample.logprobs)
    labels = torch.cat([input_ids[:, 1:], torch.full((num, 1), pad_token_id, dtype=torch.long)], dim=1)
    if overlong_filtering:
        loss_mask *= overlong_filter_mask(["length" if s.truncated else "stop" for s in samples]).unsqueeze(1)
    advantages = torch.tensor([s.advantage for s in samples]).reshape(num, 1)
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "loss_mask": loss_mask,
        "rollout_logprobs": rollout_logprobs,
        "advantages": advantages.expand(num, width).contiguous(),
    }
    if samples[0].routed_experts is not None:
        batch["routed_experts"] = _routes_tensor(samples, width)
    return batch


def _routes_tensor(samples: list[TrainingSample], width: int) -> torch.Tensor:
    _, layers, top_k = samples[0].routed_experts.shape
    routes = torch.arange(top_k, dtype=torch.int32).expand(len(samples), width, layers, top_k).clone()
    for row, sample in enumerate(samples):
        routes[row, : sample.routed_experts.shape[0]] = sample.routed_experts
    return routes


def data_parallel_rows(num_samples: int, mini_batch_size: int, dp_size: int, dp_rank: int) -> list[int]:
    """The rows of a step's ``num_samples`` that data-parallel rank ``dp_rank`` trains: its equal share of each
    mini-batch of ``mini_batch_size`` consecutive samples. Its local mini-batches are these rows, in order,
    ``mini_batch_size // dp_size`` at a time."""
    share = mini_batch_size // dp_size
    return [
        row
        for start in range(0, num_samples, mini_batch_size)
        for row in range(start + dp_rank * share, start + (dp_rank + 1) * share)
    ]


def sample_cost(length: int, hidden_size: int) -> float:
    """A sample's estimated training cost in token-equivalents: per layer the linear layers' FLOPs grow with its
    tokens (about 24 h² each) and causal attention's with the square of its length (QKᵀ and AV over half the
    square: about 2 h · length per token), so ``length · (1 + length / (12 h))`` up to a common factor."""
    return length * (1 + length / (12 * hidden_size))


def data_parallel_partition(costs: list[float], mini_batch_size: int, dp_size: int, balance: bool) -> list[list[int]]:
    """Each data-parallel rank's rows of a step's samples (with their estimated ``costs``): the same number from
    each mini-batch of ``mini_batch_size`` consecutive samples, in mini-batch order.

    ``balance``: within each mini-batch, longest-processing-time first — samples by decreasing cost (ties: the
    lower row) each go to the rank with the least cost so far among those with room (ties: the lower rank) —
    so the ranks' summed costs are even, and every rank computes the same partition from the same costs.
    Otherwise ``data_parallel_rows``. The gradient does not depend on the partition: every loss normalisation
    is over the whole mini-batch.
    """
    if not balance:
        return [data_parallel_rows(len(costs), mini_batch_size, dp_size, rank) for rank in range(dp_size)]
    share = mini_batch_size // dp_size
    partition: list[list[int]] = [[] for _ in range(dp_size)]
    for start in range(0, len(costs), mini_batch_size):
        rows = range(start, min(start + mini_batch_size, len(costs)))
        load, taken = [0.0] * dp_size, [[] for _ in range(dp_size)]
        for row in sorted(rows, key=lambda r: (-costs[r], r)):
            rank = min((r for r in range(dp_size) if len(taken[r]) < share), key=lambda r: (load[r], r))
            load[rank] += costs[row]
            taken[rank].append(row)
        for rank in range(dp_size):
            partition[rank] += sorted(taken[rank])
    return partition


def cost_imbalance(costs: list[float], partition: list[list[int]], mini_batch_size: int) -> float:
    """The slowest rank's cost over the mean, summed over mini-batches (the ranks meet at each mini-batch's
    gradient all-reduce): 1 is perfectly even."""
    share = mini_batch_size // len(partition)
    slowest = mean = 0.0
    for start in range(0, len(partition[0]), share):
        loads = [sum(costs[row] for row in rows[start : start + share]) for rows in partition]
        slowest, mean = slowest + max(loads), mean + sum(loads) / len(loads)
    return slowest / mean if mean else 1.0


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch on ``device`` (the actor's): moved once, before anything combines it with model outputs."""
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def split_batch(batch: dict[str, torch.Tensor], chunk_size: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive chunks of ``chunk_size`` samples (mini-batches for optimiser steps, micro-batches)."""
    size = next(iter(batch.values())).shape[0]
    return [{k: v[i : i + chunk_size] for k, v in batch.items()} for i in range(0, size, chunk_size)]


def sample_lengths(loss_mask: torch.Tensor) -> list[int]:
    """Each sample's length: the end of its last ``loss_mask`` position (later positions affect nothing that is
    trained or logged), at least 1. Host integers: the one device-to-host copy of micro-batch planning."""
    positions = torch.arange(1, loss_mask.shape[1] + 1, device=loss_mask.device).expand_as(loss_mask)
    return (positions * (loss_mask > 0)).amax(dim=1).clamp_min(1).tolist()


def padding_aware_micro_batches(
    batch: dict[str, torch.Tensor],
    micro_batch_size: int,
    width_multiple: int = 1,
    uniform_width: bool = False,
    lengths: list[int] | None = None,
    max_tokens: int = 0,
) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
    """Micro-batches of samples sorted by length (longest first), each cut to its own longest sample.

    ``lengths`` default to ``sample_lengths(batch["loss_mask"])``. Widths are rounded up to ``width_multiple``
    (TP size under sequence parallelism); with ``uniform_width`` every micro-batch gets the longest sample's
    width (interleaved pipelines). ``max_tokens`` > 0 replaces the fixed ``micro_batch_size`` by a token budget:
    each micro-batch takes as many of the next samples as fit in that many padded tokens (its first, longest
    sample sets the width; a sample longer than the budget goes alone). Deterministic in the lengths, so the
    pipeline stages of one replica cut the same micro-batches. Returns the micro-batches and ``order`` (on the
    batch's device): micro-batch rows concatenated are ``batch`` rows ``order``.
    """
    lengths = sample_lengths(batch["loss_mask"]) if lengths is None else lengths
    ranked = sorted(range(len(lengths)), key=lambda row: -lengths[row])  # stable: ties keep batch order
    order = torch.tensor(ranked, device=batch["loss_mask"].device)
    sorted_batch = {k: v[order] for k, v in batch.items()}

    def padded(length: int) -> int:
        return -(-length // width_multiple) * width_multiple

    micro_batches, start = [], 0
    while start < len(ranked):
        width = padded(lengths[ranked[0]] if uniform_width else lengths[ranked[start]])
        count = max(1, max_tokens // width) if max_tokens else micro_batch_size
        micro_batches.append({k: _fit_width(v[start : start + count], width) for k, v in sorted_batch.items()})
        start += count
    return micro_batches, order


def _fit_width(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """``[b, s, ...]`` cut, or zero-padded on the right, to ``width`` positions."""
    if width <= tensor.shape[1]:
        return tensor[:, :width]
    padding = tensor.new_zeros(tensor.shape[0], width - tensor.shape[1], *tensor.shape[2:])
    return torch.cat([tensor, padding], dim=1)


def unsort_rows(parts: list[torch.Tensor], order: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of ``padding_aware_micro_batches`` for per-token outputs: zero-pad to ``width``, undo the sort."""
    padded = torch.cat([_fit_width(part, width) for part in parts])
    result = torch.empty_like(padded)
    result[order] = padded
    return result
