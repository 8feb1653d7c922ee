"""Per-token log-probability and entropy from vocab-parallel logits, three ways.

All three compute, for each token, ``log π(label)`` and the entropy of the sampling distribution
``softmax(logits / temperature)`` over the *real* vocabulary (padded columns ≥ ``vocab_size`` get no mass,
docs/pitfalls.md, 9), with logits split over the tensor-parallel group by vocabulary rows (``[..., V/TP]`` per rank):

- ``naive_logprobs_entropy``: all-gathers the full-vocabulary logits and uses ``log_softmax`` (the reference);
- ``vocab_parallel_logprobs_entropy``: never gathers; all-reduces MAX and SUM of per-token statistics over the
  TP group, fp32 arithmetic, closed-form backward (recomputed from the caller's untouched logits);
- ``fused_linear_logprobs_entropy``: takes the last hidden states and the output-layer weight shard and
  processes tokens in chunks, recomputing each chunk's logits in backward, so that no ``[tokens, V/TP]``
  tensor outlives one chunk.

Gradients: d logp / dz = one-hot − p and dH/dz = −p (z − E_p[z]) for tempered logits z; the entropy term is
skipped when nothing uses the entropy's gradient (DAPO's entropy coefficient is 0). The shared pieces live
in ``ops/vocab_parallel.py``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel
from torch.distributed import ProcessGroup

from megatron_dapo.ops.vocab_parallel import (
    fused_linear_chunks,
    logit_grad,
    shard_offset,
    softmax_stats,
    tempered_logits,
)


class VocabParallelLogProbs(torch.autograd.Function):
    """(logits shard ``[..., V/TP]``, labels ``[...]``) → (log-prob ``[...]``, entropy ``[...]``), fp32."""

    @staticmethod
    def forward(ctx, logits_shard, labels, vocab_size, temperature, group):
        vocab_start = shard_offset(logits_shard.shape[-1], group)
        z = tempered_logits(logits_shard, vocab_start, vocab_size, temperature, scratch=False)
        log_normaliser, target, mean_logit = softmax_stats(z, labels, vocab_start, group)
        ctx.save_for_backward(logits_shard, labels, log_normaliser, mean_logit)
        ctx.vocab_size, ctx.temperature, ctx.vocab_start = vocab_size, temperature, vocab_start
        ctx.set_materialize_grads(False)
        return target - log_normaliser, log_normaliser - mean_logit

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        logits_shard, labels, log_normaliser, mean_logit = ctx.saved_tensors
        z = tempered_logits(logits_shard, ctx.vocab_start, ctx.vocab_size, ctx.temperature, scratch=False)
        if z is logits_shard:  # logit_grad overwrites z: never the caller's logits
            z = z.clone()
        grad = logit_grad(
            z, labels, ctx.vocab_start, log_normaliser, mean_logit, grad_logprob, grad_entropy, ctx.temperature
        )
        return grad.to(logits_shard.dtype), None, None, None, None


class FusedLinearLogProbs(torch.autograd.Function):
    """(hidden ``[N, H]``, weight shard ``[V/TP, H]``, labels ``[N]``) → (log-prob ``[N]``, entropy ``[N]``).

    Processes ``chunk_size`` tokens at a time and recomputes their logits in backward. The hidden states
    are replicated over the TP group, so their gradient is all-reduced over it here (the job of the
    column-parallel output layer's input region, which this op replaces).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_size, temperature, group, chunk_size):
        result = fused_linear_chunks(hidden, weight, labels, vocab_size, temperature, group, chunk_size)
        ctx.save_for_backward(hidden, weight, labels, result.log_normaliser, result.mean_logit)
        ctx.vocab_size, ctx.temperature, ctx.group, ctx.chunk_size = vocab_size, temperature, group, chunk_size
        ctx.set_materialize_grads(False)
        return result.logprob, result.entropy

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        hidden, weight, labels, log_normaliser, mean_logit = ctx.saved_tensors

        def grads_of(part: slice, _logprob: torch.Tensor | None):
            return (None if grad_logprob is None else grad_logprob[part], None if grad_entropy is None else grad_entropy[part])

        result = fused_linear_chunks(
            hidden, weight, labels, ctx.vocab_size, ctx.temperature, ctx.group, ctx.chunk_size, grads_of,
            saved_stats=(log_normaliser, mean_logit),
        )
        return result.grad_hidden.to(hidden.dtype), result.grad_weight.to(weight.dtype), None, None, None, None, None


def vocab_parallel_logprobs_entropy(
    logits_shard: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    temperature: float = 1.0,
    group: ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused per-token ``(logprob, entropy)`` from this rank's logits shard; ``group`` is the TP group."""
    return VocabParallelLogProbs.apply(logits_shard, labels, vocab_size, temperature, group)


def fused_linear_logprobs_entropy(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    temperature: float = 1.0,
    group: ProcessGroup | None = None,
    chunk_size: int = 512,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked output layer + per-token ``(logprob, entropy)``; ``hidden`` is ``[..., H]``, outputs ``[...]``."""
    leading = hidden.shape[:-1]
    logprob, entropy = FusedLinearLogProbs.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight_shard, labels.reshape(-1), vocab_size, temperature, group, chunk_size
    )
    return logprob.reshape(leading), entropy.reshape(leading)


def naive_logprobs_entropy(
    logits_shard: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    temperature: float = 1.0,
    group: ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: gather the full-vocabulary logits over TP, mask padding, ``log_softmax``. Entropy detached."""
    logits = logits_shard
    if group is not None and dist.get_world_size(group) > 1:
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits_shard, group)
    logits = logits.float() / temperature
    padding = torch.arange(logits.shape[-1], device=logits.device) >= vocab_size
    logits = logits.masked_fill(padding, float("-inf"))
    log_probs = torch.log_softmax(logits, dim=-1)
    logprob = log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(log_probs.exp() * log_probs.masked_fill(padding, 0.0)).sum(-1)
    return logprob, entropy
