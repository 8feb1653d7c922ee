"""The built-in CPU tasks, written in the DAPO-Math-17K schema (``data.toy_task``).

- ``arithmetic`` (the default run): ``a+b=`` with a, b in 0..49, answered in one line ``Answer: <sum>``.
- ``countdown``: ``Count down from 47 by 6.`` (start 10..99, step 3..9), answered by the worked countdown
  ``47 41 35 29 23 17 11 5 Answer: 5`` (each number the one before minus the step, until below the step) of
  14 to about 110 tokens. Its length grows with the problem, so that ``rollout.max_response_length`` binds for
  rambling or looping samples and DAPO's overlong handling and token-level loss have something to act on.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Literal

import datasets

ToyTask = Literal["arithmetic", "countdown"]
DATA_SOURCES: dict[str, str] = {"arithmetic": "toy-arithmetic", "countdown": "toy-countdown"}
_COUNTDOWN = re.compile(r"Count down from (\d+) by (\d+)\.")


def _arithmetic_problem(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return f"{a}+{b}=", a + b


def _countdown_problem(rng: random.Random) -> tuple[str, int]:
    start, step = rng.randint(10, 99), rng.randint(3, 9)
    return f"Count down from {start} by {step}.", start % step


def countdown_problem(prompt: str) -> tuple[int, int]:
    """``(start, step)`` of a ``countdown`` prompt (``Count down from 47 by 6.`` → ``(47, 6)``)."""
    match = _COUNTDOWN.fullmatch(prompt)
    if match is None:
        raise ValueError(f"not a countdown problem: {prompt!r}")
    return int(match.group(1)), int(match.group(2))


def make_toy_rows(num_rows: int, seed: int, task: ToyTask = "arithmetic") -> list[dict]:
    """``num_rows`` problems of ``task`` in DAPO-Math-17K row format."""
    problem = {"arithmetic": _arithmetic_problem, "countdown": _countdown_problem}[task]
    rng = random.Random(seed)
    rows = []
    for index in range(num_rows):
        content, answer = problem(rng)
        rows.append(
            {
                "data_source": DATA_SOURCES[task],
                "prompt": [{"role": "user", "content": content}],
                "ability": "MATH",
                "reward_model": {"style": "rule", "ground_truth": str(answer)},
                "extra_info": {"index": index},
            }
        )
    return rows


def write_toy_dataset(path: str | Path, num_rows: int, seed: int, task: ToyTask = "arithmetic") -> Path:
    """Write toy problems to a parquet file (through ``datasets``) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(make_toy_rows(num_rows, seed, task)).to_parquet(str(path))
    return path
