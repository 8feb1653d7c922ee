"""Fused-linear loss with gradients computed in the forward pass (the training path of ``fused_linear``).

When the loss is a sum over tokens of a function of each token's log-prob (DAPO's is: clipped policy
gradient, TIS weights, KL, aggregation weights), its gradient w.r.t. each log-prob is known as soon as the
log-prob is. So each chunk's logits are computed once: the chunk's log-probs go through the loss, autograd
on that chunk's small ``[C]`` vector gives d loss / d logprob, and the logit gradient is turned into
``grad_hidden`` and ``grad_weight`` right away. Three vocabulary-sized matmuls in all, as the naive path
has, instead of four with recomputation; backward only scales the saved gradients.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.distributed import ProcessGroup

from megatron_dapo.ops.vocab_parallel import fused_linear_chunks

ChunkLoss = Callable[[torch.Tensor, slice], torch.Tensor]


class FusedLinearLoss(torch.autograd.Function):
    """(hidden ``[N, H]``, weight shard ``[V/TP, H]``, labels ``[N]``, chunk loss) → (loss, logprob, entropy)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_size, temperature, group, chunk_size, chunk_loss):
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)

        def grads_of(part: slice, chunk_logprob: torch.Tensor):
            with torch.enable_grad():
                chunk_logprob = chunk_logprob.clone().requires_grad_(True)
                chunk_value = chunk_loss(chunk_logprob, part)
                (grad_logprob,) = torch.autograd.grad(chunk_value, chunk_logprob)
            loss.add_(chunk_value.detach())
            return grad_logprob, None

        result = fused_linear_chunks(hidden, weight, labels, vocab_size, temperature, group, chunk_size, grads_of)
        ctx.save_for_backward(result.grad_hidden.to(hidden.dtype), result.grad_weight.to(weight.dtype))
        ctx.mark_non_differentiable(result.logprob, result.entropy)
        return loss, result.logprob, result.entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_logprob, _grad_entropy):
        # Scaled in place: the saved gradients are ours and backward runs once (no retain_graph), so the
        # [V/TP, H] weight gradient is not allocated a second time.
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden.mul_(grad_loss), grad_weight.mul_(grad_loss), None, None, None, None, None, None


def fused_linear_loss(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    labels: torch.Tensor,
    chunk_loss: ChunkLoss,
    vocab_size: int,
    temperature: float = 1.0,
    group: ProcessGroup | None = None,
    chunk_size: int = 512,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, logprob, entropy)``: ``loss = Σ_chunks chunk_loss(logprob[chunk], chunk)`` (differentiable).

    ``hidden`` is ``[..., H]``; ``labels``, and the returned (detached) ``logprob`` and ``entropy`` have its
    leading shape; ``chunk_loss`` receives the flattened token slice of each chunk.
    """
    leading = hidden.shape[:-1]
    loss, logprob, entropy = FusedLinearLoss.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight_shard, labels.reshape(-1), vocab_size, temperature, group,
        chunk_size, chunk_loss,
    )
    return loss, logprob.reshape(leading), entropy.reshape(leading)
