"""What a run reads: the Hugging Face model folder and the prompts of the data files. For the toy default,
global rank 0 writes the toy problems and builds the warm-started toy model under ``trainer.output_dir``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import yaml
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from megatron_dapo.config import DapoConfig, config_to_dict
from megatron_dapo.data import PromptRecord, find_duplicates, load_prompt_files, write_toy_dataset
from megatron_dapo.distributed import is_rank_zero, run_on_rank_zero
from megatron_dapo.errors import ConfigError
from megatron_dapo.model_config import check_routing_replay, validate_hf_config
from megatron_dapo.rollout.collect import encode_prompt
from megatron_dapo.toy import build_toy_checkpoint, build_toy_tokenizer, toy_hf_config


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of an HF folder exactly as its ``tokenizer.json`` defines it.

    transformers 5's ``AutoTokenizer`` picks the tokenizer class from the model type and, for Qwen2, rebuilds the
    pre-tokenizer (Qwen's regex and byte-level mapping) instead of reading the file's: the toy character
    tokenizer then dropped every space. ``tokenizer.json`` is what the model was trained with, so it wins.
    """
    if (Path(folder) / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def model_hf_config(config: DapoConfig) -> PretrainedConfig:
    """The policy's HF config (``model.hf_path``'s, or the toy model's), read before anything is built."""
    if config.model.hf_path is None:
        return toy_hf_config(config.toy_model, build_toy_tokenizer())
    hf_dir = Path(config.model.hf_path)
    if not (hf_dir / "config.json").is_file():
        raise ConfigError(f"model.hf_path={hf_dir} has no config.json; point it at a Hugging Face model folder")
    return AutoConfig.from_pretrained(hf_dir)


def check_model_fits_layout(config: DapoConfig) -> None:
    """Refuse a model the parallel layout cannot shard (heads vs TP, layers vs PP) or whose positions cannot hold
    ``data.max_prompt_length`` + ``rollout.max_response_length`` tokens, before any work starts."""
    par = config.parallel
    hf_config = model_hf_config(config)
    validate_hf_config(
        hf_config,
        par.tensor_model_parallel_size,
        par.pipeline_model_parallel_size,
        par.virtual_pipeline_model_parallel_size,
        par.expert_model_parallel_size,
        par.expert_tensor_parallel_size,
    )
    check_routing_replay(hf_config, config.algorithm.routing_replay == "rollout")
    max_prompt, max_response = config.data.max_prompt_length, config.rollout.max_response_length
    if max_prompt is not None and max_prompt + max_response > hf_config.max_position_embeddings:
        raise ConfigError(
            f"data.max_prompt_length={max_prompt} + rollout.max_response_length={max_response} = "
            f"{max_prompt + max_response} tokens exceeds max_position_embeddings={hf_config.max_position_embeddings} "
            "of the model; lower either"
        )


class PromptTooLongError(ConfigError):
    """A prompt does not fit ``data.max_prompt_length`` or the model's positions; the message names the prompt."""


def fit_prompts(
    records: list[PromptRecord], tokenizer: PreTrainedTokenizerBase, config: DapoConfig, max_positions: int, what: str
) -> tuple[list[PromptRecord], int]:
    """The records whose prompt (chat template applied) fits, and how many were dropped.

    A prompt longer than ``data.max_prompt_length`` is refused or dropped (``data.overlong_prompt``); without
    that limit, one that leaves fewer than ``rollout.max_response_length`` positions of the model is refused: the
    engine would fail on it mid-run, after hours of work.
    """
    data, max_response = config.data, config.rollout.max_response_length
    budget = config.parallel.max_tokens_per_micro_batch
    kept = []
    for index, record in enumerate(records):
        length = len(encode_prompt(tokenizer, record))
        where = f"{what}: prompt {index} ({record.messages[-1].get('content', '')[:40]!r}...)"
        if budget and length + 1 > budget and data.max_prompt_length is None:
            raise PromptTooLongError(
                f"{where} has {length} tokens; parallel.max_tokens_per_micro_batch={budget} must be at least the "
                "longest prompt + 1: raise it (or set data.max_prompt_length with data.overlong_prompt=drop)"
            )
        if data.max_prompt_length is None:
            if length + max_response > max_positions:
                raise PromptTooLongError(
                    f"{where} has {length} tokens; + rollout.max_response_length={max_response} "
                    f"exceeds max_position_embeddings={max_positions}: set data.max_prompt_length (with "
                    "data.overlong_prompt=drop to skip such prompts) or lower rollout.max_response_length"
                )
        elif length > data.max_prompt_length:
            if data.overlong_prompt == "refuse":
                raise PromptTooLongError(
                    f"{where} has {length} tokens > data.max_prompt_length={data.max_prompt_length}; "
                    "raise it or set data.overlong_prompt=drop"
                )
            continue
        kept.append(record)
    dropped = len(records) - len(kept)
    if records and not kept:
        raise PromptTooLongError(
            f"{what}: all {dropped} prompts are longer than data.max_prompt_length={data.max_prompt_length}; raise it"
        )
    if dropped and is_rank_zero():
        print(f"data: {what}: dropped {dropped} of {len(records)} prompts longer than data.max_prompt_length="
              f"{data.max_prompt_length} (data.overlong_prompt=drop)", flush=True)
    return kept, dropped


def validation_files(config: DapoConfig) -> list[str]:
    """``data.val_files``; with the toy task (no ``data.train_files``) and none given, the toy held-out problems,
    written to ``output_dir/data/val.parquet`` (by the calling rank; the same problems for the same
    ``data.toy_num_val`` and ``data.toy_seed``)."""
    data = config.data
    if data.val_files or data.train_files:
        return list(data.val_files)
    path = Path(config.trainer.output_dir) / "data" / "val.parquet"
    return [str(write_toy_dataset(path, data.toy_num_val, data.toy_seed + 1, data.toy_task))]


def write_run_config(config: DapoConfig) -> None:
    """The run's whole config as ``output_dir/config.yaml``, for reading what a run used."""
    out = Path(config.trainer.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def training_files(config: DapoConfig) -> list[str]:
    """``data.train_files``, or the toy task's problems written to ``output_dir/data/train.parquet``."""
    data = config.data
    if data.train_files:
        return list(data.train_files)
    path = Path(config.trainer.output_dir) / "data" / "train.parquet"
    return [str(write_toy_dataset(path, data.toy_num_train, data.toy_seed, data.toy_task))]


def build_toy_warm_start(
    config: DapoConfig, train_files: list[str], hf_dir: str | Path, interrupt: Callable[[], None] | None = None
) -> Path:
    """The toy policy warm-started on ``train_files``' problems, saved as an HF folder: what a run with
    ``model.hf_path: null`` builds, and what experiments build once to share between runs (examples/ablation)."""
    return build_toy_checkpoint(config.toy_model, load_prompt_files(train_files), hf_dir, config.trainer.seed,
                                config.logging.progress_bar, interrupt)


def prepare_inputs(
    config: DapoConfig, interrupt: Callable[[], None] | None = None
) -> tuple[str, list[str], list[str]]:
    """The HF model folder and the train/validation files (collective: rank 0 creates the toy ones). ``interrupt``
    may end the toy warm start by raising; every rank then raises it."""
    out = Path(config.trainer.output_dir)
    hf_dir = config.model.hf_path or str(out / "toy_init")

    def create() -> tuple[list[str], list[str]]:
        out.mkdir(parents=True, exist_ok=True)
        train_files = training_files(config)
        if config.model.hf_path is None:
            build_toy_warm_start(config, train_files, hf_dir, interrupt)
        return train_files, validation_files(config)

    train_files, val_files = run_on_rank_zero(create)
    return hf_dir, train_files, val_files


def load_prompts(files: list[str], deduplicate: bool) -> list[PromptRecord]:
    """The records of ``files``, without repeated rows when ``deduplicate`` (``data.deduplicate``); rank 0 says
    how many rows were repeated, and warns about prompts with more than one ground truth (all kept)."""
    records = load_prompt_files(files)
    found = find_duplicates(records)
    repeated = len(records) - len(found.unique)
    if is_rank_zero():
        where = ", ".join(files)
        if deduplicate:
            print(f"data: {where}: kept {len(found.unique)} of {len(records)} rows ({repeated} duplicates dropped; "
                  "data.deduplicate=false keeps them)", flush=True)
        else:
            print(f"data: {where}: {len(records)} rows, {repeated} of them duplicates, kept (data.deduplicate=false)",
                  flush=True)
        if found.ambiguous_prompts:
            print(f"data: warning: {where}: {found.ambiguous_prompts} prompt(s) with more than one ground truth; "
                  "every row kept, each scored against its own answer", flush=True)
    return found.unique if deduplicate else records
