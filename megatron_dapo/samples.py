"""The sample and group types shared by rollout (which produces them) and training (which consumes them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RolloutSample:
    """One sampled response.

    ``token_ids``: response tokens (the stop token included when the engine stopped on it);
    ``logprobs``: the engine's log-probability of each of them under the sampling distribution
    (temperature applied; not renormalised over a top-p nucleus); ``finish_reason``: ``"stop"`` or
    ``"length"`` (``"abort"`` for requests cancelled before they finished). ``routed_experts``: for a MoE
    model, the experts the engine's router chose for every token it forwarded (the prompt's, then each response
    token's but the last, which is sampled and never forwarded), per MoE layer; what routing replay replays.
    ``entropy_sum``: the sampling distribution's entropy summed over the response tokens, where the engine sees
    the whole distribution (the CPU engine); ``None`` where it returns only the sampled tokens' log-probs (SGLang).
    """

    prompt_index: int
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    routed_experts: torch.Tensor | None = None  # MoE: int32 [prompt + response − 1, MoE layers, top-k] (below)
    entropy_sum: float | None = None

    def entropy_total(self) -> float:
        """The response's summed token entropy: the engine's exact value, else −Σ log π(token) of the sampled
        tokens, whose expectation under the sampling distribution is that entropy (an unbiased estimate)."""
        return self.entropy_sum if self.entropy_sum is not None else -sum(self.logprobs)


@dataclass
class Group:
    """The G samples of one prompt with their correctness and (shaped) rewards."""

    prompt_ids: list[int]
    samples: list[RolloutSample]
    acc: list[float]  # raw correctness 0/1: what dynamic sampling filters on
    rewards: list[float]  # ±1 plus the overlong penalty: what advantages are computed from


@dataclass
class TrainingSample:
    """One sample as the actor trains on it: token ids, the engine's log-probs, its group's advantage."""

    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    advantage: float
    truncated: bool  # stopped by the length limit: what overlong filtering masks out
    routed_experts: torch.Tensor | None = None  # the engine's routes (RolloutSample.routed_experts)
