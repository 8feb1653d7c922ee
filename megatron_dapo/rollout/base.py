"""The small interface every rollout engine serves (in-process ``transformers`` on CPU, SGLang on GPU)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterable

import torch

Bucket = list[tuple[str, torch.Tensor]]


@dataclass
class RolloutSample:
    """One sampled response.

    ``token_ids``: response tokens (the stop token included when the engine stopped on it);
    ``logprobs``: the engine's log-probability of each of them under the sampling distribution
    (temperature applied, renormalised over the top-p nucleus); ``finish_reason``: ``"stop"`` or ``"length"``.
    """

    prompt_index: int
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str


class RolloutEngine(ABC):
    """Generates samples and receives new weights by Hugging Face name."""

    @abstractmethod
    def generate(
        self, prompt_token_ids: list[list[int]], n: int, temperature: float, top_p: float, max_new_tokens: int
    ) -> list[RolloutSample]:
        """``n`` samples per prompt, prompt-major (the samples of prompt 0 first)."""

    @abstractmethod
    def update_weights(self, buckets: Iterable[Bucket]) -> None:
        """Load full tensors by HF name, streamed as buckets; the last bucket ends the update."""

    @abstractmethod
    def release_memory(self) -> None:
        """Free weights/KV cache before the training phase (colocated engines)."""

    @abstractmethod
    def resume_memory(self) -> None:
        """Re-acquire memory after the training phase, before weights are synced."""

    def state_dict(self) -> dict:
        """What a resumed run needs to sample as the uninterrupted run would have."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``."""
