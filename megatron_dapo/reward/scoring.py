"""Scoring responses with a pluggable reward function, inline or in a pool of worker processes.

``reward.function`` names a ``module:function`` with the contract ``compute_score(response, ground_truth,
**extra) -> float | dict``: ``extra`` holds the data row's other fields; a dict carries ``score`` and may
carry ``acc`` (correctness, what dynamic sampling filters on; default ``score > 0``), ``pred`` and
``timed_out``. Worker processes run the function in their main thread, where signal-based time bounds such
as math-verify's work.
"""

from __future__ import annotations

import importlib
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from typing import Callable, Sequence

from megatron_dapo.errors import ConfigError
from megatron_dapo.reward.math_reward import Score

DEFAULT_REWARD_FUNCTION = "megatron_dapo.reward.math_reward:compute_score"
Item = tuple[str, str, dict]  # response text, ground truth, the row's other fields


@lru_cache(maxsize=None)
def load_reward_function(spec: str) -> Callable[..., object]:
    """The function ``module:function`` names; a ``ConfigError`` naming ``reward.function`` otherwise."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ConfigError(f"reward.function={spec!r} must look like 'package.module:function'")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"reward.function={spec!r} cannot be loaded: {error}") from None
    if not callable(function):
        raise ConfigError(f"reward.function={spec!r} is not callable")
    return function


def as_score(result: object, spec: str) -> Score:
    """A reward function's result as a ``Score``."""
    if isinstance(result, bool) or not isinstance(result, (int, float, dict)):
        raise ConfigError(f"reward.function={spec!r} returned {result!r}; return a float or a dict with 'score'")
    if not isinstance(result, dict):
        return Score(score=float(result), acc=result > 0, pred=None, timed_out=False)
    if "score" not in result:
        raise ConfigError(f"reward.function={spec!r} returned a dict without 'score': {sorted(result)}")
    score = float(result["score"])
    return Score(score=score, acc=bool(result.get("acc", score > 0)), pred=result.get("pred"),
                 timed_out=bool(result.get("timed_out", False)))


def score_items(spec: str, items: Sequence[Item]) -> list[Score]:
    """Score ``items`` in this process (also what a pool worker runs)."""
    function = load_reward_function(spec)
    return [as_score(function(response, ground_truth, **extra), spec) for response, ground_truth, extra in items]


class RewardScorer:
    """Scores responses with ``reward.function``: inline (``num_workers=0``) or in worker processes."""

    def __init__(self, spec: str = DEFAULT_REWARD_FUNCTION, num_workers: int = 0) -> None:
        load_reward_function(spec)  # a wrong spec fails now, naming the key
        self.spec = spec
        self.num_workers = num_workers
        self._pool: ProcessPoolExecutor | None = None

    def score(self, items: Sequence[Item]) -> list[Score]:
        if self.num_workers <= 0 or len(items) <= 1:
            return score_items(self.spec, items)
        if self._pool is None:  # spawned: no copy of the trainer's threads and process groups
            self._pool = ProcessPoolExecutor(self.num_workers, mp_context=multiprocessing.get_context("spawn"))
        chunk = -(-len(items) // self.num_workers)
        parts = [items[start : start + chunk] for start in range(0, len(items), chunk)]
        return [score for part in self._pool.map(score_items, [self.spec] * len(parts), parts) for score in part]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
