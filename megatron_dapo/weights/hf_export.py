"""Write HF-named tensors as a Hugging Face model folder that ``transformers`` loads."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import PretrainedConfig, PreTrainedTokenizerBase


def save_hf_checkpoint(
    state: dict[str, torch.Tensor],
    hf_config: PretrainedConfig,
    out_dir: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """``config.json`` + ``model.safetensors`` (+ tokenizer files). Tied models carry no ``lm_head.weight``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().to(dtype).contiguous() for name, tensor in state.items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    hf_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir
