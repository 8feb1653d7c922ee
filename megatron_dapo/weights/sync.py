"""The actor's weights leaving its Megatron shards: into a rollout engine (weight sync), into an HF folder
(export), or into one dict (tests and small tools). Each function is collective: every rank calls it, and
ranks that receive nothing still take part in the resharder's collectives to its end.

See docs/design.md, "Weight sync" for what the resharder guarantees.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Protocol

import torch
import torch.distributed as dist
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from megatron_dapo.model_config import ModelLayout
from megatron_dapo.weights.hf_export import write_hf_folder
from megatron_dapo.weights.transfer import (
    DEFAULT_BUCKET_BYTES,
    Bucket,
    ModelChunks,
    hf_specs,
    stream_hf_buckets,
    weights_of,
)


class WeightReceiver(Protocol):
    """Anything that loads full HF-named tensors streamed as buckets (a rollout engine)."""

    def update_weights(self, buckets: Iterable[Bucket]) -> None: ...


def _drain(stream: Iterable) -> None:
    for _ in stream:
        pass


def sync_weights(
    model: ModelChunks, layout: ModelLayout, receiver: WeightReceiver | None, bucket_bytes: int, dtype: torch.dtype
) -> None:
    """Stream the weights, resharded into HF names/layouts and cast to ``dtype``, bucket by bucket into
    ``receiver`` (given on global rank 0, ``None`` elsewhere)."""
    buckets = stream_hf_buckets(model, layout, bucket_bytes, dtype=dtype)
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
) -> None:
    """Write the weights as a Hugging Face folder on global rank 0, streamed bucket by bucket."""
    specs = hf_specs(model, layout)
    tensors = (pair for bucket in stream_hf_buckets(model, layout, bucket_bytes) for pair in bucket)
    if dist.get_rank() == 0:
        write_hf_folder(specs, tensors, hf_config, out_dir, tokenizer)
    _drain(tensors)


def hf_state_dict(
    model: ModelChunks, layout: ModelLayout, tensor_of: Callable[[torch.nn.Parameter], torch.Tensor] = weights_of
) -> dict[str, torch.Tensor] | None:
    """All HF-named weights (or, with ``tensor_of=gradients_of``, gradients) on global rank 0, ``None`` elsewhere."""
    stream = stream_hf_buckets(model, layout, DEFAULT_BUCKET_BYTES, tensor_of=tensor_of)
    state = {name: tensor.clone() for bucket in stream for name, tensor in bucket}
    return state if dist.get_rank() == 0 else None
