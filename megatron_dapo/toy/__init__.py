"""The offline toy model: a tiny Qwen2 (or Qwen3, Qwen3-MoE) and a character tokenizer, warm-started on the toy task."""

from megatron_dapo.toy.toy_model import build_toy_checkpoint, build_toy_tokenizer, toy_hf_config

__all__ = ["build_toy_checkpoint", "build_toy_tokenizer", "toy_hf_config"]
