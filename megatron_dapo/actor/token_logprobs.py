"""Per-token log-probabilities and entropy from vocab-parallel logits (naive reference path).

The logits are gathered over the tensor-parallel group into the full vocabulary (differentiably), divided by
the sampling temperature exactly as the rollout engine does (pitfall 3), and the padded vocabulary entries
are masked so that they never receive probability mass (pitfall 9). The caller's logits are not modified.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel


def token_logprobs_and_entropy(
    logits_shard: torch.Tensor, labels: torch.Tensor, vocab_size: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``labels`` and the entropy of the sampling distribution at each position.

    Args:
        logits_shard: ``[batch, seq, padded_vocab / TP]`` this rank's slice of the output layer.
        labels: ``[batch, seq]`` target token ids (< ``vocab_size``).
        vocab_size: the model config's real vocabulary size; columns at or beyond it are padding.
        temperature: sampling temperature of the rollout.

    Returns:
        ``logprobs [batch, seq]`` (differentiable) and ``entropy [batch, seq]`` (detached), both fp32.
    """
    logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits_shard).float() / temperature
    padding = torch.arange(logits.shape[-1], device=logits.device) >= vocab_size
    logits = logits.masked_fill(padding, float("-inf"))
    log_probs = torch.log_softmax(logits, dim=-1)
    logprobs = log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        probs = log_probs.exp()
        entropy = -(probs * log_probs.masked_fill(padding, 0.0)).sum(-1)
    return logprobs, entropy
