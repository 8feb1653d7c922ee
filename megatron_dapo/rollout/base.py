"""The small interface every rollout engine serves (in-process ``transformers`` on CPU, SGLang on GPU).

An engine takes *group requests* — n samples of one prompt, drawn with the group's own seed — and hands back
groups as they complete. A group's samples depend only on its seed, its prompt and the weights: not on which
engine runs it, nor on what else is in its batch (docs/design.md, "Rollout across the job").
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable

import numpy as np
import torch

from megatron_dapo.samples import RolloutSample
from megatron_dapo.weights.transfer import Bucket

TRAIN_DRAW, EVAL_DRAW = 0, 1


def group_seed(seed: int, draw: int, step: int, position: int) -> int:
    """A group's sampling seed from ``trainer.seed``, the kind of draw (training or evaluation), the step and
    the group's position in the step's draw order — never from the engine or the batch it lands in."""
    return int(np.random.SeedSequence([seed, draw, step, position]).generate_state(1, np.uint64)[0] >> 1)


@dataclass(frozen=True)
class GroupRequest:
    """``n`` samples of one prompt. ``key`` names the group (its position in the step's draw order)."""

    key: int
    prompt_ids: list[int]
    n: int
    seed: int
    temperature: float
    top_p: float
    max_new_tokens: int


class RolloutEngine(ABC):
    """Generates groups of samples and receives new weights by Hugging Face name.

    ``weight_dtype`` is a property of the engine class: every rank (not only the engine's) needs it to size
    the resharder's buffers, so it is known without an engine instance.
    """

    weight_dtype: ClassVar[torch.dtype]
    abort_requested: Callable[[], bool] | None = None

    @abstractmethod
    def submit(self, requests: list[GroupRequest]) -> None:
        """Start generating these groups."""

    @abstractmethod
    def collect(self) -> dict[int, list[RolloutSample]]:
        """Groups completed since the last call, by key: at least one while any is in flight (an in-process
        engine generates everything submitted, as one batch)."""

    def watch_for_abort(self, requested: Callable[[], bool] | None) -> None:
        """While set, an in-process engine generating a batch polls ``requested`` between tokens and gives the
        batch up when it returns true (the groups stay queued for ``abort``): the step is decided and another
        host waits for this one. An asynchronous engine (SGLang) ignores it: ``abort`` reaches it at once."""
        self.abort_requested = requested

    @abstractmethod
    def abort(self) -> int:
        """Cancel the groups still in flight (their partial results are dropped); how many there were."""

    def generate(self, requests: list[GroupRequest]) -> dict[int, list[RolloutSample]]:
        """Every requested group, by key (submit, then collect until all are back)."""
        self.submit(requests)
        results: dict[int, list[RolloutSample]] = {}
        while len(results) < len(requests):
            results.update(self.collect())
        return results

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
        """What a resumed run needs from the engine (sampling needs nothing: it is seeded per group)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``."""
