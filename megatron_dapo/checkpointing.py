"""Megatron distributed checkpoints (torch_dist) of the actor: save, resume, weights-only load.

Layout of ``<save_dir>``:

- ``iter_0000010/``: megatron-core's torch_dist files (model, optimizer, LR scheduler, trainer state in
  ``common.pt``) and ``hf_config/`` (the model's HF config and tokenizer, for validation and conversion);
- ``latest_checkpointed_iteration.txt``: written last, so a job killed while saving leaves the previous
  checkpoint as the latest.

A checkpoint loads under any TP/PP layout (megatron reshards). Checkpoints carry no ``_extra_state``
(FP8 recipe state is not used).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerBase

from megatron_dapo.errors import different_models
from megatron_dapo.model_config import check_same_model
from megatron_dapo.weights.checkpoint_reader import HF_CONFIG_DIR, TRACKER_FILE, iteration_dir, resolve_checkpoint
from megatron_dapo.weights.transfer import ModelChunks, chunks_of, unwrap

def optimizer_metadata() -> dict[str, str]:
    """How the distributed optimizer's state is laid out in a checkpoint.

    GPU: megatron-core's default ``fully_sharded_model_space``: each rank writes views of its own fp32 shard
    (no gather, no copy) and the checkpoint reshards over TP, PP and DP
    (``megatron/core/optimizer/distrib_optimizer.py:1223-1226,1689-1770`` in 0.16.1). CPU: that format fails
    ("flattened_range is not supported"), so ``fully_reshardable``, which gathers every shard's state into host
    memory on each DP rank at each save — affordable at toy scale only.
    """
    sharding = "fully_sharded_model_space" if torch.cuda.is_available() else "fully_reshardable"
    return {"distrib_optim_sharding_type": sharding}


def model_sharded_state_dict(model: ModelChunks) -> dict:
    """``{"model": ...}`` (``{"model0": ..., "model1": ...}`` for interleaved chunks) without ``_extra_state``."""
    states = [
        {k: v for k, v in unwrap(chunk).sharded_state_dict().items() if not k.endswith("_extra_state")}
        for chunk in chunks_of(model)
    ]
    return {"model": states[0]} if len(states) == 1 else {f"model{i}": state for i, state in enumerate(states)}


def save_checkpoint(
    model: ModelChunks,
    optimizer: MegatronOptimizer,
    scheduler: OptimizerParamScheduler,
    hf_config: PretrainedConfig,
    save_dir: str | Path,
    step: int,
    trainer_state: dict,
    tokenizer: PreTrainedTokenizerBase | None,
) -> Path:
    """Save model, optimizer, scheduler and ``trainer_state`` at ``step`` (collective)."""
    path = iteration_dir(save_dir, step)
    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)  # left by a job killed while saving: never the latest
        path.mkdir(parents=True)
    dist.barrier()
    model_state = model_sharded_state_dict(model)
    state = {
        **model_state,
        "optimizer": optimizer.sharded_state_dict(model_state, metadata=optimizer_metadata()),
        "scheduler": scheduler.state_dict(),
        "trainer": trainer_state,
    }
    dist_checkpointing.save(state, str(path))
    dist.barrier()
    if dist.get_rank() == 0:
        hf_config.save_pretrained(path / HF_CONFIG_DIR)
        if tokenizer is not None:
            tokenizer.save_pretrained(path / HF_CONFIG_DIR)
        (Path(save_dir) / TRACKER_FILE).write_text(str(step))
    return path


def load_checkpoint(
    model: ModelChunks,
    hf_config: PretrainedConfig,
    path: str | Path,
    optimizer: MegatronOptimizer | None = None,
    scheduler: OptimizerParamScheduler | None = None,
) -> dict | None:
    """Load model weights (and optimizer + scheduler when given) under the model's layout (collective).

    Refuses a checkpoint saved for another model (its ``hf_config/`` is compared with ``hf_config``).
    Returns the saved trainer state (``None`` for a weights-only checkpoint such as hf_to_megatron's).
    """
    path = resolve_checkpoint(path)
    saved_config = path / HF_CONFIG_DIR
    if saved_config.exists():
        check_same_model(hf_config, AutoConfig.from_pretrained(saved_config), f"checkpoint {path}")
    model_state = model_sharded_state_dict(model)
    request = dict(model_state)
    if optimizer is not None:
        request["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=True, metadata=optimizer_metadata())
    loaded = dist_checkpointing.load(request, str(path))
    for chunk, key in zip(chunks_of(model), model_state):
        missing, unexpected = unwrap(chunk).load_state_dict(loaded[key], strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise different_models(f"checkpoint {path}: missing {missing}, unexpected {unexpected}")
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(loaded["scheduler"])
    return loaded.get("trainer")


def remove_old_checkpoints(save_dir: str | Path, keep_last: int) -> None:
    """Delete all but the ``keep_last`` newest ``iter_*`` folders (the tracker's is always among them)."""
    folders = sorted(Path(save_dir).glob("iter_*"), key=lambda folder: int(folder.name.removeprefix("iter_")))
    for folder in folders[: max(len(folders) - keep_last, 0)]:
        shutil.rmtree(folder, ignore_errors=True)
