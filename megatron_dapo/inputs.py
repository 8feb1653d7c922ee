"""What a run reads: the Hugging Face model folder and the data files. For the toy default, global rank 0
writes the toy problems and builds the warm-started toy model under ``trainer.output_dir``."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from megatron_dapo.config import DapoConfig
from megatron_dapo.data import load_prompt_files, write_toy_dataset
from megatron_dapo.distributed import run_on_rank_zero
from megatron_dapo.errors import ConfigError
from megatron_dapo.model_config import validate_hf_config
from megatron_dapo.toy import build_toy_checkpoint, build_toy_tokenizer, toy_hf_config


def model_hf_config(config: DapoConfig) -> PretrainedConfig:
    """The policy's HF config (``model.hf_path``'s, or the toy model's), read before anything is built."""
    if config.model.hf_path is None:
        return toy_hf_config(config.toy_model, build_toy_tokenizer())
    hf_dir = Path(config.model.hf_path)
    if not (hf_dir / "config.json").is_file():
        raise ConfigError(f"model.hf_path={hf_dir} has no config.json; point it at a Hugging Face model folder")
    return AutoConfig.from_pretrained(hf_dir)


def check_model_fits_layout(config: DapoConfig) -> None:
    """Refuse a model the parallel layout cannot shard (heads vs TP, layers vs PP), before any work starts."""
    par = config.parallel
    validate_hf_config(
        model_hf_config(config),
        par.tensor_model_parallel_size,
        par.pipeline_model_parallel_size,
        par.virtual_pipeline_model_parallel_size,
    )


def prepare_inputs(config: DapoConfig) -> tuple[str, list[str], list[str]]:
    """The HF model folder and the train/validation files (collective: rank 0 creates the toy ones)."""
    out = Path(config.trainer.output_dir)
    hf_dir = config.model.hf_path or str(out / "toy_init")

    def create() -> tuple[list[str], list[str]]:
        train_files, val_files = list(config.data.train_files), list(config.data.val_files)
        if not train_files:
            data = config.data
            train_files = [str(write_toy_dataset(out / "data" / "train.parquet", data.toy_num_train, data.toy_seed))]
            if not val_files:
                val_files = [str(write_toy_dataset(out / "data" / "val.parquet", data.toy_num_val, data.toy_seed + 1))]
        if config.model.hf_path is None:
            build_toy_checkpoint(
                config.toy_model, load_prompt_files(train_files), hf_dir, config.trainer.seed, config.logging.progress_bar
            )
        return train_files, val_files

    train_files, val_files = run_on_rank_zero(create)
    return hf_dir, train_files, val_files
