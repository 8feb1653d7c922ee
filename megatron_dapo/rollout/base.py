"""The small interface every rollout engine serves (in-process ``transformers`` on CPU, SGLang on GPU)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Iterable

import torch

from megatron_dapo.samples import RolloutSample
from megatron_dapo.weights.transfer import Bucket


class RolloutEngine(ABC):
    """Generates samples and receives new weights by Hugging Face name.

    ``weight_dtype`` is a property of the engine class: every rank (not only the engine's) needs it to size
    the resharder's buffers, so it is known without an engine instance.
    """

    weight_dtype: ClassVar[torch.dtype]

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
        """Free weights, KV cache and CUDA graphs before the training phase (colocated engines); return once
        the memory is free."""

    @abstractmethod
    def resume_memory(self, tags: Iterable[str] = ("weights", "kv_cache", "cuda_graph")) -> None:
        """Re-acquire released memory: ``("weights",)`` before a weight sync, the KV cache and CUDA graphs after."""

    def state_dict(self) -> dict:
        """What a resumed run needs to sample as the uninterrupted run would have."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``."""
