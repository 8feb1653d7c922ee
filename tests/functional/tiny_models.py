"""Tiny random Hugging Face checkpoints for tests."""

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM


def make_tiny_qwen2(path, tied: bool, seed: int = 0, num_layers: int = 2) -> Qwen2ForCausalLM:
    """A random Qwen2 with GQA, QKV bias, and a vocabulary (50) that Megatron pads (to 128)."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=1_000_000.0,
        tie_word_embeddings=tied,
        pad_token_id=0,
        eos_token_id=1,
    )
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # large random weights (and non-zero biases) so that layout errors show
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    model.save_pretrained(path)
    return model
