"""Write streamed HF-named tensors as a Hugging Face model folder that ``transformers`` loads.

``config.json``, ``model-0000k-of-0000n.safetensors`` shards with ``model.safetensors.index.json``, and the
tokenizer files. Tensors are written as they arrive (one at a time in memory). The folder is assembled
under a temporary name and renamed at the end, so an interrupted export never leaves a half folder
under the final name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable

import torch
from tqdm import tqdm
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from megatron_dapo.weights.safetensors_io import INDEX_FILE, SafetensorsStreamWriter, TensorSpec, shard_specs

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def write_hf_folder(
    specs: list[TensorSpec],
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    hf_config: PretrainedConfig,
    out_dir: str | Path,
    tokenizer: PreTrainedTokenizerBase | str | Path | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = False,
) -> Path:
    """Write ``named_tensors`` (arriving in ``specs`` order, cast to each spec's dtype) as an HF folder.

    ``tokenizer`` is a tokenizer object or a folder whose tokenizer files are copied.
    """
    out_dir = Path(out_dir)
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        shards = shard_specs(specs, max_shard_bytes)
        weight_map: dict[str, str] = {}
        tensors = iter(named_tensors)
        bar = tqdm(total=sum(s.nbytes for s in specs), unit="B", unit_scale=True, desc="export", disable=not progress)
        for number, shard in enumerate(shards, start=1):
            file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            writer = SafetensorsStreamWriter(staging / file_name, shard)
            for spec in shard:
                name, tensor = next(tensors)
                writer.write(name, tensor.to(spec.dtype))
                del tensor  # free it before the next one is produced
                weight_map[name] = file_name
                bar.update(spec.nbytes)
            writer.close()
        bar.close()
        index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
        (staging / INDEX_FILE).write_text(json.dumps(index, indent=2))
        hf_config.save_pretrained(staging)
        if isinstance(tokenizer, (str, Path)):
            copy_tokenizer_files(Path(tokenizer), staging)
        elif tokenizer is not None:
            tokenizer.save_pretrained(staging)
    except BaseException:  # a torn source, a full disk, Ctrl-C: no half folder is left, not even the staged one
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return out_dir


TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "generation_config.json", "chat_template.jinja",
)


def copy_tokenizer_files(src: Path, dst: Path, required: bool = True) -> None:
    """Copy the tokenizer (and generation config) files present in ``src``; refuse a folder with none
    unless not ``required``."""
    found = [name for name in TOKENIZER_FILES if (src / name).exists()]
    if required and not any(name.startswith("tokenizer") or name == "vocab.json" for name in found):
        raise FileNotFoundError(f"--tokenizer {src}: no tokenizer files (tokenizer.json, tokenizer_config.json, ...)")
    for name in found:
        shutil.copy(src / name, dst / name)
