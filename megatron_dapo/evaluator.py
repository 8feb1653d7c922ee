"""``megatron-dapo eval``: the training run's held-out evaluation of a Hugging Face folder, without training.

No actor is built: the rollout engines (``rollout.engine``, one per ``rollout.ranks_per_engine`` ranks, as in
training) load the folder's weights and sample the validation problems with the seeds a training evaluation
uses, so an exported policy (``<output_dir>/hf_final``) scores what the run's last evaluation scored.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist

from megatron_dapo.config import DapoConfig
from megatron_dapo.distributed import destroy_distributed, initialize_process_group, run_on_rank_zero
from megatron_dapo.errors import ConfigError
from megatron_dapo.evaluation import EvalSummary, summarize
from megatron_dapo.inputs import load_prompts, load_tokenizer, validation_files
from megatron_dapo.reward import RewardScorer
from megatron_dapo.rollout.collect import JobRollout
from megatron_dapo.rollout.factory import EnginePlacement, build_rollout_engine

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_hf_folder(hf_dir: str | None) -> Path:
    """The folder to evaluate; a one-line ``ConfigError`` when it is not given or lacks a config or tokenizer."""
    if hf_dir is None:
        raise ConfigError("megatron-dapo eval needs --hf-dir <folder>: a Hugging Face model folder such as "
                          "<trainer.output_dir>/hf_final")
    folder = Path(hf_dir)
    if not folder.is_dir():
        raise ConfigError(f"--hf-dir {folder}: no such folder")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"--hf-dir {folder} has no config.json; point it at a Hugging Face model folder (an "
                          "export such as <trainer.output_dir>/hf_final, or tools/checkpoint_convert/megatron_to_hf.py's)")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"--hf-dir {folder} has no tokenizer ({', '.join(TOKENIZER_FILES)}); megatron_to_hf.py "
                          "--tokenizer <dir> writes one")
    return folder


def evaluate_hf_folder(config: DapoConfig, hf_dir: str | None) -> EvalSummary:
    """Evaluate the folder's policy on the validation problems over every rank of the job (a world of one under
    plain ``python``); the summary is known to every rank."""
    folder = str(check_hf_folder(hf_dir))
    initialize_process_group(config.trainer.distributed_timeout_minutes)
    world_size = dist.get_world_size()
    config.validate(world_size, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)), training=False)
    files = run_on_rank_zero(lambda: validation_files(config))
    if not files:
        raise ConfigError("megatron-dapo eval needs validation problems: set data.val_files (parquet/jsonl in "
                          "DAPO-Math-17K format), or leave data.train_files empty for the toy ones")
    records = load_prompts(files, config.data.deduplicate)
    tokenizer = load_tokenizer(folder)
    ro, seed = config.rollout, config.trainer.seed
    placement = EnginePlacement(ro.ranks_per_engine, world_size)
    engine = build_rollout_engine(ro, placement, folder, tokenizer, seed, weights_by_sync=False,
                                  timeout_minutes=config.trainer.distributed_timeout_minutes)
    # no actor: every rank is its own data-parallel rank (only training samples travel by it)
    rollout = JobRollout(engine, placement, tokenizer, ro, config.algorithm,
                         RewardScorer(config.reward.function, config.reward.num_workers), seed,
                         list(range(world_size)))
    summary = summarize(rollout.evaluate(records), [record.data_source for record in records])
    destroy_distributed()
    return summary
