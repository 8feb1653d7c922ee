"""Shared pieces of the vocab-parallel log-prob ops: per-token softmax statistics over the TP group, the
closed-form logit gradient, and the one chunk loop of the fused-linear ops.

Logits are split over the tensor-parallel group by vocabulary rows (``[..., V/TP]`` per rank); padded
vocabulary columns (>= ``vocab_size``) get no probability mass (docs/pitfalls.md, 9).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

PAD_LOGIT = -1e30  # finite: exp() underflows to 0 and 0 · PAD_LOGIT stays 0 (no NaN in the entropy terms)


def all_reduce(tensor: torch.Tensor, op: dist.ReduceOp, group: ProcessGroup | None) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def shard_offset(shard_size: int, group: ProcessGroup | None) -> int:
    """First vocabulary row held by this rank."""
    return 0 if group is None else dist.get_rank(group) * shard_size


def tempered_logits(
    logits_shard: torch.Tensor, vocab_start: int, vocab_size: int, temperature: float, scratch: bool
) -> torch.Tensor:
    """fp32 ``logits / temperature`` with padded vocabulary columns set to ``PAD_LOGIT``.

    ``scratch=True``: the input is a temporary of ours and is modified in place. Otherwise it is left
    untouched; a copy is made only when something has to change.
    """
    z = logits_shard.float()
    first_padded = max(vocab_size - vocab_start, 0)
    has_padding = first_padded < z.shape[-1]
    if z is logits_shard and not scratch and (temperature != 1.0 or has_padding):
        z = z.clone()
    if temperature != 1.0:
        z.div_(temperature)
    if has_padding:
        z[..., first_padded:] = PAD_LOGIT
    return z


def local_labels(labels: torch.Tensor, vocab_start: int, shard_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Label index inside this shard (clamped) and whether the label lives in this shard."""
    local = labels - vocab_start
    in_shard = (local >= 0) & (local < shard_size)
    return local.clamp(0, shard_size - 1), in_shard


def softmax_stats(
    z: torch.Tensor, labels: torch.Tensor, vocab_start: int, group: ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token ``(log_normaliser, target_logit, mean_logit)`` of softmax(z) over all shards.

    Two collectives: MAX of the shard maxima, then one SUM of [Σ e^(z−m), Σ e^(z−m)·z, z_label].
    """
    max_logit = all_reduce(z.max(dim=-1).values, dist.ReduceOp.MAX, group)
    exp_z = (z - max_logit.unsqueeze(-1)).exp_()
    local, in_shard = local_labels(labels, vocab_start, z.shape[-1])
    target = z.gather(-1, local.unsqueeze(-1)).squeeze(-1) * in_shard
    sum_exp = exp_z.sum(-1)
    sum_exp_z = exp_z.mul_(z).sum(-1)  # exp_z is ours: reuse its storage rather than a third [tokens, V] tensor
    sums = torch.stack([sum_exp, sum_exp_z, target])
    sum_exp, sum_exp_z, target = all_reduce(sums, dist.ReduceOp.SUM, group)
    return max_logit + torch.log(sum_exp), target, sum_exp_z / sum_exp


def logit_grad(
    z: torch.Tensor,
    labels: torch.Tensor,
    vocab_start: int,
    log_normaliser: torch.Tensor,
    mean_logit: torch.Tensor,
    grad_logprob: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """Gradient w.r.t. the raw logits shard (fp32): ``[one-hot·g_lp − p·(g_lp + g_H·(z − E_p z))] / T``.

    Consumes ``z`` (tempered logits): the result is computed in its storage.
    """
    coefficient = grad_logprob if grad_logprob is not None else torch.zeros_like(log_normaliser)
    entropy_term = None
    if grad_entropy is not None:
        entropy_term = (z - mean_logit.unsqueeze(-1)).mul_(grad_entropy.unsqueeze(-1))
    grad = z.sub_(log_normaliser.unsqueeze(-1)).exp_()  # probabilities, in place
    if entropy_term is not None:
        grad.mul_(entropy_term.add_(coefficient.unsqueeze(-1))).neg_()
    else:
        grad.mul_(-coefficient.unsqueeze(-1))
    if grad_logprob is not None:
        local, in_shard = local_labels(labels, vocab_start, z.shape[-1])
        grad.scatter_add_(-1, local.unsqueeze(-1), (grad_logprob * in_shard).unsqueeze(-1))
    if temperature != 1.0:
        grad.div_(temperature)
    return grad


def chunk_logits(
    hidden_chunk: torch.Tensor, weight: torch.Tensor, vocab_start: int, vocab_size: int, temperature: float
) -> torch.Tensor:
    """Tempered, padding-masked fp32 logits of one chunk of tokens (a scratch tensor of the caller's)."""
    return tempered_logits(hidden_chunk @ weight.t(), vocab_start, vocab_size, temperature, scratch=True)


def accumulate_linear_grads(
    grad_z: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    part: slice,
    grad_hidden: torch.Tensor,
    grad_weight: torch.Tensor,
) -> None:
    """Turn a chunk's logit gradient into its rows of ``grad_hidden`` and add its share of ``grad_weight``."""
    grad_hidden[part] = grad_z.to(weight.dtype) @ weight
    grad_weight.addmm_(grad_z.t(), hidden[part].float())  # in place: no [V/TP, H] temporary per chunk


ChunkGrads = Callable[[slice, torch.Tensor | None], tuple[torch.Tensor | None, torch.Tensor | None]]


class ChunkedPass(NamedTuple):
    """What one pass of ``fused_linear_chunks`` produced (``None`` where it was not asked for)."""

    logprob: torch.Tensor | None
    entropy: torch.Tensor | None
    log_normaliser: torch.Tensor
    mean_logit: torch.Tensor
    grad_hidden: torch.Tensor | None
    grad_weight: torch.Tensor | None


def fused_linear_chunks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    temperature: float,
    group: ProcessGroup | None,
    chunk_size: int,
    grads_of: ChunkGrads | None = None,
    saved_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> ChunkedPass:
    """One pass over ``chunk_size`` tokens at a time of the output layer ``hidden [N, H] @ weight [V/TP, H]ᵀ``.

    Each chunk's tempered logits exist only inside its iteration. Without ``saved_stats`` the pass computes
    the per-token softmax statistics (two TP collectives per chunk) and ``logprob``/``entropy``; with them
    (``(log_normaliser, mean_logit)`` of an earlier pass) it only recomputes logits. With ``grads_of``,
    ``grads_of(part, logprob[part])`` gives d loss / d logprob and d loss / d entropy of the chunk's tokens,
    turned at once into ``grad_hidden`` (all-reduced over TP: the hidden states are replicated there) and
    ``grad_weight``.
    """
    vocab_start = shard_offset(weight.shape[0], group)
    num_tokens = hidden.shape[0]
    logprob = entropy = grad_hidden = grad_weight = None
    if saved_stats is None:
        logprob = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)
        entropy, log_normaliser, mean_logit = torch.empty_like(logprob), torch.empty_like(logprob), torch.empty_like(logprob)
    else:
        log_normaliser, mean_logit = saved_stats
    if grads_of is not None:
        grad_hidden = torch.empty_like(hidden, dtype=torch.float32)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
    for start in range(0, num_tokens, chunk_size):
        part = slice(start, start + chunk_size)
        z = chunk_logits(hidden[part], weight, vocab_start, vocab_size, temperature)
        if saved_stats is None:
            log_normaliser[part], target, mean_logit[part] = softmax_stats(z, labels[part], vocab_start, group)
            logprob[part] = target - log_normaliser[part]
            entropy[part] = log_normaliser[part] - mean_logit[part]
        if grads_of is not None:
            grad_logprob, grad_entropy = grads_of(part, None if logprob is None else logprob[part])
            grad_z = logit_grad(
                z, labels[part], vocab_start, log_normaliser[part], mean_logit[part], grad_logprob, grad_entropy, temperature
            )
            accumulate_linear_grads(grad_z, hidden, weight, part, grad_hidden, grad_weight)
    if grad_hidden is not None:
        all_reduce(grad_hidden, dist.ReduceOp.SUM, group)
    return ChunkedPass(logprob, entropy, log_normaliser, mean_logit, grad_hidden, grad_weight)
