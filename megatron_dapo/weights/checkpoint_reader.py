"""Megatron torch_dist checkpoints as seen from outside megatron-core: folder layout, tensor shapes, reads.

A torch_dist checkpoint stores each parameter as one global tensor, whatever TP/PP saved it: layer
parameters are stacked on a leading layer axis, TP shards sit at their offsets, and ``linear_fc1`` is
``[gate; up]`` — i.e. the TP=1 layout. Reading asks torch.distributed.checkpoint (the format under
torch_dist) for one layer's box of one key: peak memory stays near one tensor, no process group and no
megatron-core import are needed (the offline converter's memory floor stays at torch's).

Layout of a save folder: ``iter_0000010/`` (torch_dist files + ``hf_config/``, the model's HF config and
tokenizer, and the ``complete`` marker, written last of the folder) and ``latest_checkpointed_iteration.txt``,
written after it.

A checkpoint is *complete* when its save finished (the marker, or the tracker naming it: saves from before the
marker) and *readable* when its files are there: megatron's ``metadata.json`` and ``common.pt``, torch's
``.metadata`` (it loads), and every shard file at least as long as the byte ranges ``.metadata`` gives it — a
truncated shard shows here, without reading a tensor. A node failure can tear a checkpoint after its save
finished, so resuming checks both and falls back to the newest checkpoint that passes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.futures import Future
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from transformers import PretrainedConfig

from megatron_dapo.errors import CheckpointNotFoundError, CheckpointUnusableError, different_models
from megatron_dapo.model_config import ModelLayout, has_qk_norm, has_qkv_bias, num_experts
from megatron_dapo.weights.hf_mapping import ParamMapping, megatron_to_hf, param_mapping
from megatron_dapo.weights.safetensors_io import TensorSpec

TRACKER_FILE = "latest_checkpointed_iteration.txt"
HF_CONFIG_DIR = "hf_config"
COMPLETE_MARKER = "complete"
# What a failed torch_dist save or load raises: torch's CheckpointException derives from BaseException, not
# Exception (torch/distributed/checkpoint/api.py:30), so ``except Exception`` alone lets it through.
CHECKPOINT_FAILURES = (Exception, CheckpointException)
ITERATION_FOLDER = re.compile(r"iter_(\d+)")


def iteration_dir(save_dir: str | Path, step: int) -> Path:
    return Path(save_dir) / f"iter_{step:07d}"


def resolve_checkpoint(path: str | Path) -> Path:
    """An ``iter_*`` folder, or a save folder (its latest checkpoint). Raises if there is none."""
    path = Path(path)
    tracker = path / TRACKER_FILE
    if tracker.exists():
        return iteration_dir(path, int(tracker.read_text().strip()))
    if (path / "metadata.json").exists():
        return path
    raise CheckpointNotFoundError(
        f"{path}: not a Megatron checkpoint (no metadata.json) nor a save folder (no {TRACKER_FILE}); "
        "point at an iter_* folder or at the folder holding latest_checkpointed_iteration.txt"
    )


def unreadable_reason(checkpoint_dir: Path) -> str | None:
    """Why ``checkpoint_dir`` cannot be loaded as a torch_dist checkpoint (``None``: its files are all there).

    Cheap: reads ``.metadata`` and the shard files' sizes, no tensor.
    """
    for name in (".metadata", "metadata.json", "common.pt"):
        if not (checkpoint_dir / name).is_file():
            return f"{name} is missing"
    try:
        storage = FileSystemReader(str(checkpoint_dir)).read_metadata().storage_data
    except Exception as error:  # any unpickling error of a damaged file
        return f".metadata cannot be read ({type(error).__name__}: {error})"
    needed: dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        shard = checkpoint_dir / name
        if not shard.is_file():
            return f"shard {name} is missing"
        if shard.stat().st_size < size:
            return f"shard {name} is truncated ({shard.stat().st_size} of {size} bytes)"
    return None


def check_readable(checkpoint_dir: Path) -> None:
    """Refuse a torn checkpoint in one line, naming the newest complete one beside it when there is one."""
    problem = unreadable_reason(checkpoint_dir)
    if problem is None:
        return
    older = next((folder for folder, why in saved_iterations(checkpoint_dir.parent) if why is None), None)
    fix = f"use {older}, the newest complete checkpoint beside it" if older else "use another checkpoint"
    raise CheckpointUnusableError(f"checkpoint {checkpoint_dir} is torn: {problem}; {fix}")


def saved_iterations(save_dir: str | Path) -> list[tuple[Path, str | None]]:
    """Every ``iter_*`` folder of ``save_dir``, newest first, with why it cannot be resumed (``None``: it can)."""
    save_dir = Path(save_dir)
    tracker = save_dir / TRACKER_FILE
    tracked = tracker.read_text().strip() if tracker.is_file() else ""
    tracked = iteration_dir(save_dir, int(tracked)) if tracked.isdigit() else None
    folders = [f for f in save_dir.glob("iter_*") if f.is_dir() and ITERATION_FOLDER.fullmatch(f.name)]
    folders.sort(key=lambda folder: int(folder.name.removeprefix("iter_")), reverse=True)
    result = []
    for folder in folders:
        finished = (folder / COMPLETE_MARKER).is_file() or folder == tracked
        result.append((folder, unreadable_reason(folder) or (None if finished else "its save did not finish")))
    return result




def strict_resume_refusal(folder: Path, problem: str) -> CheckpointUnusableError:
    """The error of ``trainer.resume: strict`` (``--strict-resume``) when the newest checkpoint is torn."""
    return CheckpointUnusableError(
        f"checkpoint {folder} is torn: {problem}; trainer.resume=strict refuses to fall back to an older "
        "one: set trainer.resume=true (drop --strict-resume) to resume from the newest complete checkpoint"
    )

def newest_resumable(save_dir: str | Path) -> Path | None:
    """The newest ``iter_*`` folder of ``save_dir`` that is complete and readable (``None``: there is none)."""
    return next((folder for folder, why in saved_iterations(save_dir) if why is None), None)

LAYER_KEY = "decoder.layers."
# Experts are stored with a second leading axis, the global expert, whatever EP/ETP saved them; the local
# spec's SequentialMLP and Transformer Engine's TEGroupedMLP write the same keys (megatron/core/transformer/
# moe/experts.py, both ``sharded_state_dict``s).
EXPERT_KEY = f"{LAYER_KEY}mlp.experts.experts."
EMBEDDING_KEY = "embedding.word_embeddings.weight"
OUTPUT_KEY = "output_layer.weight"
FINAL_NORM_KEY = "decoder.final_layernorm.weight"


@dataclass(frozen=True)
class CheckpointTensor:
    """One tensor of a checkpoint key: the whole key, one layer's slice, or one layer's slice of one expert."""

    key: str
    layer: int | None = None
    expert: int | None = None

    @property
    def leading_axes(self) -> int:
        """How many leading axes of the stored tensor (layer, expert) this item indexes."""
        return (self.layer is not None) + (self.expert is not None)

    def mapping(self, layout: ModelLayout) -> ParamMapping:
        """The HF mapping of this item, through the stage-local name megatron-core gives the parameter."""
        if self.layer is None:
            return param_mapping(self.key, None, layout)
        suffix = self.key[len(LAYER_KEY):]
        if self.expert is not None:
            suffix = f"mlp.experts.local_experts.{self.expert}.{self.key[len(EXPERT_KEY):]}"
        return param_mapping(f"{LAYER_KEY}{self.layer}.{suffix}", self.layer, layout)


def megatron_shapes(hf_config: PretrainedConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """Checkpoint key -> (global shape without the vocabulary padding rule, config fields it follows).

    Layer keys carry the leading layer axis, expert keys a layer and an expert axis. Vocabulary rows are
    checked separately (padding).
    """
    layout = ModelLayout.from_hf_config(hf_config)
    h, layers = hf_config.hidden_size, hf_config.num_hidden_layers
    qkv_rows = (layout.num_attention_heads + 2 * layout.num_key_value_heads) * layout.head_dim
    heads = "num_attention_heads, num_key_value_heads, head_dim, hidden_size"
    shapes = {
        EMBEDDING_KEY: ((layout.vocab_size, h), "vocab_size, hidden_size"),
        f"{LAYER_KEY}self_attention.linear_qkv.layer_norm_weight": ((layers, h), "hidden_size"),
        f"{LAYER_KEY}self_attention.linear_qkv.weight": ((layers, qkv_rows, h), heads),
        f"{LAYER_KEY}self_attention.linear_proj.weight": ((layers, h, layout.num_attention_heads * layout.head_dim), heads),
        f"{LAYER_KEY}mlp.linear_fc1.layer_norm_weight": ((layers, h), "hidden_size"),
        FINAL_NORM_KEY: ((h,), "hidden_size"),
    }
    if has_qkv_bias(hf_config):
        shapes[f"{LAYER_KEY}self_attention.linear_qkv.bias"] = ((layers, qkv_rows), heads)
    if has_qk_norm(hf_config):
        for norm in ("q_layernorm", "k_layernorm"):
            shapes[f"{LAYER_KEY}self_attention.{norm}.weight"] = ((layers, layout.head_dim), "head_dim")
    if layout.num_experts:
        experts, ffn = layout.num_experts, hf_config.moe_intermediate_size
        expert_fields = "num_experts, moe_intermediate_size, hidden_size"
        shapes[f"{LAYER_KEY}mlp.router.weight"] = ((layers, experts, h), "num_experts, hidden_size")
        shapes[f"{EXPERT_KEY}linear_fc1.weight"] = ((layers, experts, 2 * ffn, h), expert_fields)
        shapes[f"{EXPERT_KEY}linear_fc2.weight"] = ((layers, experts, h, ffn), expert_fields)
    else:
        ffn = hf_config.intermediate_size
        shapes[f"{LAYER_KEY}mlp.linear_fc1.weight"] = ((layers, 2 * ffn, h), "intermediate_size, hidden_size")
        shapes[f"{LAYER_KEY}mlp.linear_fc2.weight"] = ((layers, h, ffn), "intermediate_size, hidden_size")
    if not layout.tie_word_embeddings:
        shapes[OUTPUT_KEY] = ((layout.vocab_size, h), "vocab_size, hidden_size")
    return shapes


def tensor_order(hf_config: PretrainedConfig) -> list[CheckpointTensor]:
    """Every tensor in HF order: embedding, layer by layer (expert by expert), final norm, output layer."""
    keys = list(megatron_shapes(hf_config))
    experts = range(num_experts(hf_config))
    order = [CheckpointTensor(EMBEDDING_KEY)]
    for layer in range(hf_config.num_hidden_layers):
        for key in keys:
            if key.startswith(EXPERT_KEY):
                order += [CheckpointTensor(key, layer, expert) for expert in experts]
            elif key.startswith(LAYER_KEY):
                order.append(CheckpointTensor(key, layer))
    order += [CheckpointTensor(k) for k in (FINAL_NORM_KEY, OUTPUT_KEY) if k in keys]
    return order


def check_checkpoint_matches_config(metadata: dict, hf_config: PretrainedConfig, source: str) -> None:
    """Refuse a checkpoint whose tensors do not have the shapes ``hf_config`` implies, naming the fields."""
    for key, (shape, fields) in megatron_shapes(hf_config).items():
        if key not in metadata:
            hint = " (tie_word_embeddings)" if key == OUTPUT_KEY else ""
            raise different_models(f"{source} has no tensor {key!r}{hint}")
        got = tuple(metadata[key].size)
        if key in (EMBEDDING_KEY, OUTPUT_KEY):
            if got[1:] != shape[1:] or not shape[0] <= got[0]:
                raise different_models(f"{source}: {key} has shape {got}, the config's {fields} imply ({shape[0]} padded, {shape[1]})")
        elif key.startswith(LAYER_KEY) and got[0] != shape[0]:
            raise different_models(f"{source} has {got[0]} layers, the config's num_hidden_layers is {shape[0]}")
        elif got != shape:
            raise different_models(f"{source}: {key} has shape {got}, the config's {fields} imply {shape}")


class _BoxLoadPlanner(DefaultLoadPlanner):
    """Loads one box (``offsets``, ``shape``) of one checkpoint tensor.

    A saved chunk that is exactly the box becomes the result as loaded; otherwise chunks are copied into
    a buffer. (DCP's own reader always copies into a preallocated target: twice the tensor at peak.)
    """

    def __init__(self, key: str, offsets: tuple[int, ...], shape: tuple[int, ...], dtype: torch.dtype) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False, allow_partial_load=True)
        self.key, self.offsets, self.shape, self.dtype = key, offsets, shape, dtype
        self.result: torch.Tensor | None = None

    def create_local_plan(self) -> LoadPlan:
        box = ChunkStorageMetadata(offsets=torch.Size(self.offsets), sizes=torch.Size(self.shape))
        return LoadPlan(create_read_items_for_chunk_list(self.key, self.metadata.state_dict_metadata[self.key], [box]))

    def take(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        if tuple(tensor.shape) == self.shape and self.result is None:
            self.result = tensor
            return
        if self.result is None or tuple(self.result.shape) != self.shape:
            self.result = torch.empty(self.shape, dtype=self.dtype)
        view = self.result
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            view = view.narrow(dim, start, length)
        view.copy_(tensor)


class _HandoffReader(FileSystemReader):
    """``FileSystemReader`` that hands each loaded chunk (narrowed to the request) to ``_BoxLoadPlanner.take``."""

    def read_data(self, plan: LoadPlan, planner: _BoxLoadPlanner) -> Future:
        for item in plan.items:
            info = self.storage_data[item.storage_index]
            if info.transform_descriptors:
                raise NotImplementedError(f"checkpoint chunk of {item.storage_index.fqn} uses storage transforms")
            with self.fs.create_stream(self.fs.concat_path(self.path, info.relative_path), "rb") as stream:
                chunk = torch.load(self._slice_file(stream, info), map_location="cpu", weights_only=True)
            for dim, (start, length) in enumerate(zip(item.storage_offsets, item.lengths)):
                chunk = chunk.narrow(dim, start, length)
            planner.take(item, chunk)
        done: Future = Future()
        done.set_result(None)
        return done


def tensors_metadata(checkpoint_dir: Path) -> dict[str, TensorStorageMetadata]:
    """Checkpoint key -> global size and dtype (model tensors and optimizer state alike)."""
    return FileSystemReader(str(checkpoint_dir)).read_metadata().state_dict_metadata


def _read(checkpoint_dir: Path, item: CheckpointTensor, meta: TensorStorageMetadata) -> torch.Tensor:
    """One item's box of its checkpoint key, without the indexed leading axes."""
    shape, axes = tuple(meta.size), item.leading_axes
    index = tuple(i for i in (item.layer, item.expert) if i is not None)
    offsets = index + (0,) * (len(shape) - axes)
    planner = _BoxLoadPlanner(item.key, offsets, (1,) * axes + shape[axes:], meta.properties.dtype)
    try:
        dcp.load({}, storage_reader=_HandoffReader(str(checkpoint_dir)), planner=planner, no_dist=True)
    except CHECKPOINT_FAILURES as error:  # damaged in place: sizes right, bytes wrong (check_readable cannot see it)
        raise CheckpointUnusableError(f"checkpoint {checkpoint_dir} is torn: {item.key} cannot be read ({type(error).__name__})") from error
    return planner.result.reshape(shape[axes:])


def read_hf_tensors(
    checkpoint_dir: str | Path, hf_config: PretrainedConfig, dtype: torch.dtype | None = None
) -> tuple[list[TensorSpec], Iterator[tuple[str, torch.Tensor]]]:
    """HF tensor specs and a generator of HF-named tensors read one Megatron tensor at a time.

    ``dtype`` defaults to the checkpoint's.
    """
    checkpoint_dir = Path(checkpoint_dir)
    check_readable(checkpoint_dir)
    metadata = tensors_metadata(checkpoint_dir)
    check_checkpoint_matches_config(metadata, hf_config, f"checkpoint {checkpoint_dir}")
    layout = ModelLayout.from_hf_config(hf_config)
    order = tensor_order(hf_config)
    specs = []
    for item in order:
        meta = metadata[item.key]
        mapping = item.mapping(layout)
        placeholders = [torch.empty(tuple(meta.size)[item.leading_axes:], device="meta")]
        for name, tensor in zip(mapping.hf_names, megatron_to_hf(mapping, placeholders, layout)):
            specs.append(TensorSpec(name, tuple(tensor.shape), dtype or meta.properties.dtype))

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for item in order:
            mapping = item.mapping(layout)
            hf_tensors = megatron_to_hf(mapping, [_read(checkpoint_dir, item, metadata[item.key])], layout)
            for name in mapping.hf_names:
                yield name, hf_tensors.pop(0)  # nothing here keeps a tensor alive once it is written

    return specs, tensors()
