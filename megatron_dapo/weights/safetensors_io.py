"""Hugging Face safetensors folders: slice-wise reading and streaming, sharded writing.

``SafetensorsReader`` serves ``hf_to_megatron`` with the slices a TP rank needs. ``SafetensorsStreamWriter``
writes one ``.safetensors`` file tensor by tensor: the header is known up front from the tensors' names,
shapes and dtypes, so no more than one tensor is ever held (the ``safetensors`` package only writes whole
dicts). Files are read back with the ``safetensors`` package itself.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from megatron_dapo.errors import CheckpointMismatchError
from megatron_dapo.weights.hf_mapping import check_slice

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPES_BY_NAME = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # the converters' --dtype
_DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}


def hf_tensor_files(hf_dir: Path) -> dict[str, Path]:
    """HF tensor name -> safetensors file holding it (sharded with an index, or a single file)."""
    index = hf_dir / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: hf_dir / file for name, file in weight_map.items()}
    single = hf_dir / SINGLE_FILE
    if not single.exists():
        raise CheckpointMismatchError(f"{hf_dir}: no {SINGLE_FILE} or {INDEX_FILE}")
    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


class SafetensorsReader:
    """``TensorReader`` over an HF folder; reads only the requested slice of each tensor."""

    def __init__(self, hf_dir: str | Path) -> None:
        self.hf_dir = Path(hf_dir)
        self.files = hf_tensor_files(self.hf_dir)
        self._handles: dict[Path, object] = {}

    def _slice(self, name: str):
        if name not in self.files:
            raise CheckpointMismatchError(f"{self.hf_dir}: checkpoint has no tensor {name!r}")
        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def read(self, name: str, dim: int = 0, start: int = 0, stop: int | None = None) -> torch.Tensor:
        tensor_slice = self._slice(name)
        shape = tuple(tensor_slice.get_shape())
        stop = check_slice(name, shape, dim, start, stop)
        if not shape:
            return tensor_slice[:]
        return tensor_slice[(slice(None),) * dim + (slice(start, stop),)]


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of a tensor to be written."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class SafetensorsStreamWriter:
    """Write one safetensors file whose tensors (``specs``, in order) arrive one at a time."""

    def __init__(self, path: Path, specs: list[TensorSpec]) -> None:
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for spec in specs:
            header[spec.name] = {
                "dtype": _DTYPE_NAMES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the format aligns the data section to 8 bytes
        self._pending = list(specs)
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(encoded)) + encoded)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self._pending.pop(0)
        if (name, tuple(tensor.shape), tensor.dtype) != (spec.name, spec.shape, spec.dtype):
            raise ValueError(f"expected {spec}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        data = tensor.detach().contiguous().cpu()
        if data.numel():
            self._file.write(data.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no bytes copy

    def close(self) -> None:
        if self._pending:
            raise ValueError(f"{len(self._pending)} tensors not written, first {self._pending[0].name}")
        self._file.close()


def shard_specs(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive tensors grouped into files of at most ``max_shard_bytes`` (a larger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards
