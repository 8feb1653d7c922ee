"""Megatron distributed checkpoints (torch_dist) of the actor: save, resume, weights-only load.

Layout of ``<save_dir>``:

- ``iter_0000010/``: megatron-core's torch_dist files (model, optimizer, LR scheduler, trainer state in
  ``common.pt``), ``hf_config/`` (the model's HF config and tokenizer, for validation and conversion) and the
  ``complete`` marker, written last: a folder without it is a save that did not finish;
- ``latest_checkpointed_iteration.txt``: written after the marker (replaced atomically).

A save that fails (a full disk) fails on every rank with one line, removes its own folder and leaves the
previous checkpoint the newest complete one. What "complete" and "readable" mean: ``weights/checkpoint_reader.py``.

A checkpoint loads under any TP/PP layout (megatron reshards). Checkpoints carry no ``_extra_state``
(FP8 recipe state is not used).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerBase

from megatron_dapo.errors import CheckpointUnusableError, ConfigError, different_models
from megatron_dapo.model_config import check_same_model
from megatron_dapo.weights.checkpoint_reader import (
    CHECKPOINT_FAILURES,
    COMPLETE_MARKER,
    HF_CONFIG_DIR,
    TRACKER_FILE,
    iteration_dir,
    resolve_checkpoint,
    saved_iterations,
    tensors_metadata,
)
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
    """Save model, optimizer, scheduler and ``trainer_state`` at ``step`` (collective).

    Raises ``CheckpointUnusableError`` on every rank when any rank's write fails for want of space, permissions
    or I/O (``RuntimeError`` for any other failure), after removing the half-written folder.
    """
    path = iteration_dir(save_dir, step)
    rank_zero = dist.get_rank() == 0

    def fresh_folder() -> None:
        shutil.rmtree(path, ignore_errors=True)  # left by a job killed while saving: never complete
        path.mkdir(parents=True)

    def write_state() -> None:
        model_state = model_sharded_state_dict(model)
        state = {
            **model_state,
            "optimizer": optimizer.sharded_state_dict(model_state, metadata=optimizer_metadata()),
            "scheduler": scheduler.state_dict(),
            "trainer": trainer_state,
        }
        dist_checkpointing.save(state, str(path))

    def commit() -> None:
        hf_config.save_pretrained(path / HF_CONFIG_DIR)
        if tokenizer is not None:
            tokenizer.save_pretrained(path / HF_CONFIG_DIR)
        (path / COMPLETE_MARKER).write_text(f"{step}\n")
        tracker = Path(save_dir) / TRACKER_FILE
        staged = tracker.with_name(tracker.name + ".tmp")
        staged.write_text(str(step))
        os.replace(staged, tracker)  # a full disk leaves the old tracker, never an empty one

    for work, here in ((fresh_folder, rank_zero), (write_state, True), (commit, rank_zero)):
        failure = _failure_on_any_rank(work, here)
        if failure is not None:
            if rank_zero:
                shutil.rmtree(path, ignore_errors=True)
            previous = next((folder for folder, problem in saved_iterations(save_dir) if problem is None), None)
            kept = f"the previous checkpoint {previous.name} is intact" if previous else "there is no earlier checkpoint"
            reason = failure[0] if failure[1] or not _out_of_space(save_dir, previous) else "No space left on device"
            raise CheckpointUnusableError(f"checkpoint {path.name} could not be written: {reason}; {kept}")
    return path


def _out_of_space(save_dir: str | Path, previous: Path | None) -> bool:
    """Whether ``save_dir``'s file system could not hold another checkpoint as large as ``previous``: torch's zip
    writer reports a full disk without an errno ("[enforce fail at inline_container.cc] unexpected pos")."""
    if previous is None:
        return False
    size = sum(file.stat().st_size for file in previous.rglob("*") if file.is_file())
    return shutil.disk_usage(save_dir).free < size


def _failure_on_any_rank(work: Callable[[], object], here: bool) -> tuple[str, bool] | None:
    """Run ``work`` on this rank when ``here``; the first failure on any rank as (reason, whether it is an
    ``OSError``), the same on every rank (collective).

    Agreeing first keeps the ranks whose part succeeded from waiting forever at the next collective for one whose
    part failed (megatron-core only agrees on failures of the shard writes, not of rank 0's own files).
    """
    failure = None
    if here:
        try:
            work()
        except CHECKPOINT_FAILURES as error:  # reported on every rank by the caller
            reason = _os_error_reason(error)
            failure = (reason, True) if reason is not None else (f"{type(error).__name__}: {error}", False)
    failures = [None] * dist.get_world_size()
    dist.all_gather_object(failures, failure)
    return next((f for f in failures if f is not None), None)


def _os_error_reason(error: BaseException) -> str | None:
    """What the ``OSError`` behind ``error`` says ("No space left on device"), or ``None`` when there is none.

    Searched through exception chains and torch's ``CheckpointException``, which carries each rank's failure in
    ``failures``. A shard writer's ``OSError`` crosses a process and a pickle on its way (megatron-core's
    ``filesystem_async.py:303-330,444-449`` in 0.16.1, ``state_dict_saver.py:233-258``), which drops the chain:
    it arrives as text only ("Worker failure: [Errno 28] No space left on device"), so that text is read too.
    """
    pending, seen = [error], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError):
            return current.strerror or str(current)
        pending += [current.__cause__, current.__context__]
        pending += [failure[0] for failure in getattr(current, "failures", {}).values()]
        text = re.search(r"\[Errno \d+\] ([^:\n]+)", str(current))
        if text:
            return text.group(1).strip()
    return None


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
        _check_optimizer_fits(request["optimizer"], path)
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


def _check_optimizer_fits(optimizer_request: dict, path: Path) -> None:
    """Refuse, in one line, optimizer state saved under an incompatible expert layout.

    megatron-core gives expert parameters an optimizer of their own (state keys ``chained_<i>.``) only when
    EP > 1: ``SequentialMLP``/``TEGroupedMLP`` mark them ``allreduce=False`` then, and ``get_megatron_optimizer``
    groups by that flag (megatron/core/transformer/moe/experts.py, megatron/core/optimizer/__init__.py). Any
    other change of layout (TP, PP, DP, EP between values > 1) reshards.
    """
    saved = set(tensors_metadata(path))
    wanted = {item.key for item in nested_values(optimizer_request) if isinstance(item, (ShardedTensor, ShardedTensorFactory))}
    missing = sorted(wanted - saved)
    if not missing:
        return
    saved_chained = any(key.startswith("chained_") for key in saved)
    raise ConfigError(
        f"checkpoint {path}: its optimizer state does not fit this layout ({missing[0]!r} is not in it); the "
        f"checkpoint was saved with parallel.expert_model_parallel_size {'> 1' if saved_chained else '= 1'} and "
        "megatron-core keeps expert parameters in an optimizer of their own only when it is > 1: resume with "
        f"parallel.expert_model_parallel_size {'> 1' if saved_chained else '= 1'}, or start from its weights alone "
        f"(model.megatron_checkpoint={path} trainer.resume=false)"
    )


def remove_old_checkpoints(save_dir: str | Path, keep_last: int) -> None:
    """Keep the ``keep_last`` newest complete checkpoints; delete the older ones and the incomplete ones older
    than those. An incomplete checkpoint newer than them (a torn one a resume fell back from) stays for
    inspection and never counts towards ``keep_last``.
    """
    saved = saved_iterations(save_dir)
    complete = [folder for folder, problem in saved if problem is None]
    if keep_last <= 0 or len(complete) <= keep_last:
        return
    oldest_kept = _iteration(complete[keep_last - 1])
    for folder, _ in saved:
        if _iteration(folder) < oldest_kept:
            shutil.rmtree(folder, ignore_errors=True)


def _iteration(folder: Path) -> int:
    return int(folder.name.removeprefix("iter_"))
