"""Loss ops: per-token log-prob/entropy from vocab-parallel logits (naive, fused, fused-linear)."""

from megatron_dapo.ops.logprobs import (
    fused_linear_logprobs_entropy,
    naive_logprobs_entropy,
    vocab_parallel_logprobs_entropy,
)

__all__ = ["fused_linear_logprobs_entropy", "naive_logprobs_entropy", "vocab_parallel_logprobs_entropy"]
