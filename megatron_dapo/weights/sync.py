"""The actor's weights leaving its Megatron shards: into a rollout engine (weight sync), into an HF folder
(export), or into one dict (tests and small tools). Each function is collective: every rank calls it, and
ranks that receive nothing still take part in the resharder's collectives to its end.

See docs/design.md, "Weight sync" for what the resharder guarantees.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Collection, Iterable, Protocol

import torch
import torch.distributed as dist
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from megatron_dapo.model_config import ModelLayout
from megatron_dapo.weights.hf_export import write_hf_folder
from megatron_dapo.weights.transfer import (
    DEFAULT_BUCKET_BYTES,
    Bucket,
    ModelChunks,
    Transport,
    hf_specs,
    stream_hf_buckets,
    weights_of,
)


class WeightReceiver(Protocol):
    """Anything that loads full HF-named tensors streamed as buckets (a rollout engine's part on one rank)."""

    def update_weights(self, buckets: Iterable[Bucket]) -> None: ...


def _drain(stream: Iterable) -> None:
    for _ in stream:
        pass


def sync_weights(
    model: ModelChunks,
    layout: ModelLayout,
    receiver: WeightReceiver | None,
    receivers: Collection[int],
    bucket_bytes: int,
    dtype: torch.dtype,
    transport: Transport = "auto",
) -> None:
    """Stream the weights, resharded into HF names/layouts and cast to ``dtype``, bucket by bucket into the
    ``receiver`` of every global rank in ``receivers`` (``None`` on the other ranks)."""
    buckets = stream_hf_buckets(model, layout, bucket_bytes, dtype, receivers=receivers, transport=transport)
    if receiver is not None:
        receiver.update_weights(buckets)
    _drain(buckets)


def export_hf(
    model: ModelChunks,
    layout: ModelLayout,
    hf_config: PretrainedConfig,
    out_dir: str | Path,
    tokenizer: PreTrainedTokenizerBase | None,
    bucket_bytes: int,
    dtype: torch.dtype = torch.float32,
    transport: Transport = "auto",
) -> None:
    """Write the weights as a Hugging Face folder of ``dtype`` tensors on global rank 0, bucket by bucket."""
    specs = hf_specs(model, layout, dtype)
    stream = stream_hf_buckets(model, layout, bucket_bytes, dtype, transport=transport)
    tensors = (pair for bucket in stream for pair in bucket)
    if dist.get_rank() == 0:
        hf_config = copy.deepcopy(hf_config)
        hf_config.dtype = dtype
        write_hf_folder(specs, tensors, hf_config, out_dir, tokenizer)
    _drain(tensors)


def hf_state_dict(
    model: ModelChunks,
    layout: ModelLayout,
    tensor_of: Callable[[torch.nn.Parameter], torch.Tensor] = weights_of,
    transport: Transport = "auto",
) -> dict[str, torch.Tensor] | None:
    """All HF-named weights (or, with ``tensor_of=gradients_of``, gradients) on global rank 0, ``None`` elsewhere."""
    stream = stream_hf_buckets(model, layout, DEFAULT_BUCKET_BYTES, tensor_of=tensor_of, transport=transport)
    state = {name: tensor.clone() for bucket in stream for name, tensor in bucket}
    return state if dist.get_rank() == 0 else None
