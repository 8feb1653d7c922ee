"""Shared by the rollout benchmarks: the toy policy built once, and a worker (one process of a ``torchrun`` job,
or a plain process) that runs a number of rollout steps through ``JobRollout`` with fixed weights and writes
their metrics. Only rollout runs: no actor, no training, so the numbers are the engines' alone."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


TOY_CONFIG = ROOT / "examples" / "configs" / "toy_cpu.yaml"


def build_policy(work: Path, sft_steps: int, config_path: Path = TOY_CONFIG) -> tuple[Path, Path]:
    """The toy policy of ``config_path``'s task and warm start (for ``sft_steps``) and its training problems,
    under ``work``."""
    from megatron_dapo.config import load_config
    from megatron_dapo.data import load_prompt_files, write_toy_dataset
    from megatron_dapo.toy import build_toy_checkpoint

    config = load_config(config_path, [f"toy_model.sft_steps={sft_steps}"])
    data = write_toy_dataset(work / "train.parquet", 2000, 1234, config.data.toy_task)
    build_toy_checkpoint(config.toy_model, load_prompt_files([str(data)]), work / "policy", seed=1)
    return work / "policy", data


def run_steps(policy: Path, data: Path, steps: int, overrides: list[str], threads: int,
              config_path: Path = TOY_CONFIG) -> list[dict[str, float]]:
    """``steps`` rollout steps of ``config_path`` with ``overrides`` in this process's job; rank 0's metrics."""
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from megatron_dapo.config import load_config
    from megatron_dapo.data import PromptSampler, load_prompt_files
    from megatron_dapo.distributed import initialize_process_group
    from megatron_dapo.reward import RewardScorer
    from megatron_dapo.rollout.collect import JobRollout
    from megatron_dapo.rollout.factory import EnginePlacement, build_rollout_engine

    torch.set_num_threads(threads)
    initialize_process_group()
    config = load_config(config_path, overrides)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    records = load_prompt_files([str(data)])
    placement = EnginePlacement(config.rollout.ranks_per_engine, dist.get_world_size())
    engine = build_rollout_engine(config.rollout, placement, str(policy), tokenizer, seed=1, weights_by_sync=False)
    rollout = JobRollout(engine, placement, tokenizer, config.rollout, config.algorithm, RewardScorer(), seed=1,
                         data_parallel_rank_of=list(range(dist.get_world_size())))
    sampler = PromptSampler(len(records), seed=1)
    rollout.generate_step(records, sampler, step=0)  # warm-up: first calls, page faults
    rows = [rollout.generate_step(records, sampler, step).metrics for step in range(1, steps + 1)]
    dist.destroy_process_group()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="one process of a rollout benchmark")
    parser.add_argument("--policy", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", required=True, help="torch threads by local rank, comma-separated: 2,1")
    parser.add_argument("--config", type=Path, default=TOY_CONFIG)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    rows = run_steps(args.policy, args.data, args.steps, args.overrides, int(args.threads.split(",")[local_rank]),
                     args.config)
    if local_rank == 0:
        args.out.write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
