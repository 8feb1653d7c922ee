"""Toy arithmetic problems with integer answers, written in the DAPO-Math-17K schema (the CPU default)."""

from __future__ import annotations

import random
from pathlib import Path

import datasets

TOY_DATA_SOURCE = "toy-arithmetic"


def make_toy_rows(num_rows: int, seed: int) -> list[dict]:
    """``num_rows`` problems ``a+b=`` (a, b in 0..49) in DAPO-Math-17K row format."""
    rng = random.Random(seed)
    rows = []
    for index in range(num_rows):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        rows.append(
            {
                "data_source": TOY_DATA_SOURCE,
                "prompt": [{"role": "user", "content": f"{a}+{b}="}],
                "ability": "MATH",
                "reward_model": {"style": "rule", "ground_truth": str(a + b)},
                "extra_info": {"index": index},
            }
        )
    return rows


def write_toy_dataset(path: str | Path, num_rows: int, seed: int) -> Path:
    """Write toy problems to a parquet file (through ``datasets``) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(make_toy_rows(num_rows, seed)).to_parquet(str(path))
    return path
