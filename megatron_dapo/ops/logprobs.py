"""Per-token log-probability and entropy from vocab-parallel logits, three ways.

All three compute, for each token, ``log π(label)`` and the entropy of the sampling distribution
``softmax(logits / temperature)`` over the *real* vocabulary (padded columns ≥ ``vocab_size`` get no mass,
pitfall 9), with logits split over the tensor-parallel group by vocabulary rows (``[..., V/TP]`` per rank):

- ``naive_logprobs_entropy``: all-gathers the full-vocabulary logits and uses ``log_softmax`` (the reference);
- ``vocab_parallel_logprobs_entropy``: never gathers; all-reduces MAX and SUM of per-token statistics over the
  TP group, fp32 arithmetic, closed-form backward (recomputed from the caller's untouched logits);
- ``fused_linear_logprobs_entropy``: takes the last hidden states and the output-layer weight shard and
  processes tokens in chunks, recomputing each chunk's logits in backward, so that no ``[tokens, V/TP]``
  tensor outlives one chunk.

Gradients: d logp / dz = one-hot − p and dH/dz = −p (z − E_p[z]) for tempered logits z; the entropy term is
skipped when nothing uses the entropy's gradient (DAPO's entropy coefficient is 0).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel
from torch.distributed import ProcessGroup

PAD_LOGIT = -1e30  # finite: exp() underflows to 0 and 0 · PAD_LOGIT stays 0 (no NaN in the entropy terms)


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp, group: ProcessGroup | None) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _shard_offset(shard_size: int, group: ProcessGroup | None) -> int:
    """First vocabulary row held by this rank."""
    return 0 if group is None else dist.get_rank(group) * shard_size


def _tempered_logits(
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


def _local_labels(labels: torch.Tensor, vocab_start: int, shard_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Label index inside this shard (clamped) and whether the label lives in this shard."""
    local = labels - vocab_start
    in_shard = (local >= 0) & (local < shard_size)
    return local.clamp(0, shard_size - 1), in_shard


def _softmax_stats(
    z: torch.Tensor, labels: torch.Tensor, vocab_start: int, group: ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token ``(log_normaliser, target_logit, mean_logit)`` of softmax(z) over all shards.

    Two collectives: MAX of the shard maxima, then one SUM of [Σ e^(z−m), Σ e^(z−m)·z, z_label].
    """
    max_logit = _all_reduce(z.max(dim=-1).values, dist.ReduceOp.MAX, group)
    exp_z = (z - max_logit.unsqueeze(-1)).exp_()
    local, in_shard = _local_labels(labels, vocab_start, z.shape[-1])
    target = z.gather(-1, local.unsqueeze(-1)).squeeze(-1) * in_shard
    sum_exp = exp_z.sum(-1)
    sum_exp_z = exp_z.mul_(z).sum(-1)  # exp_z is ours: reuse its storage rather than a third [tokens, V] tensor
    sums = torch.stack([sum_exp, sum_exp_z, target])
    sum_exp, sum_exp_z, target = _all_reduce(sums, dist.ReduceOp.SUM, group)
    return max_logit + torch.log(sum_exp), target, sum_exp_z / sum_exp


def _logit_grad(
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
        local, in_shard = _local_labels(labels, vocab_start, z.shape[-1])
        grad.scatter_add_(-1, local.unsqueeze(-1), (grad_logprob * in_shard).unsqueeze(-1))
    if temperature != 1.0:
        grad.div_(temperature)
    return grad


def _chunk_logits(
    hidden_chunk: torch.Tensor, weight: torch.Tensor, vocab_start: int, vocab_size: int, temperature: float
) -> torch.Tensor:
    """Tempered, padding-masked fp32 logits of one chunk of tokens (a scratch tensor of the caller's)."""
    return _tempered_logits(hidden_chunk @ weight.t(), vocab_start, vocab_size, temperature, scratch=True)


def _accumulate_linear_grads(
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


class VocabParallelLogProbs(torch.autograd.Function):
    """(logits shard ``[..., V/TP]``, labels ``[...]``) → (log-prob ``[...]``, entropy ``[...]``), fp32."""

    @staticmethod
    def forward(ctx, logits_shard, labels, vocab_size, temperature, group):
        vocab_start = _shard_offset(logits_shard.shape[-1], group)
        z = _tempered_logits(logits_shard, vocab_start, vocab_size, temperature, scratch=False)
        log_normaliser, target, mean_logit = _softmax_stats(z, labels, vocab_start, group)
        ctx.save_for_backward(logits_shard, labels, log_normaliser, mean_logit)
        ctx.vocab_size, ctx.temperature, ctx.vocab_start = vocab_size, temperature, vocab_start
        ctx.set_materialize_grads(False)
        return target - log_normaliser, log_normaliser - mean_logit

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        logits_shard, labels, log_normaliser, mean_logit = ctx.saved_tensors
        z = _tempered_logits(logits_shard, ctx.vocab_start, ctx.vocab_size, ctx.temperature, scratch=False)
        if z is logits_shard:  # _logit_grad overwrites z: never the caller's logits
            z = z.clone()
        grad = _logit_grad(
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
        vocab_start = _shard_offset(weight.shape[0], group)
        num_tokens = hidden.shape[0]
        logprob = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)
        entropy, log_normaliser, mean_logit = torch.empty_like(logprob), torch.empty_like(logprob), torch.empty_like(logprob)
        for start in range(0, num_tokens, chunk_size):
            part = slice(start, start + chunk_size)
            z = _chunk_logits(hidden[part], weight, vocab_start, vocab_size, temperature)
            log_normaliser[part], target, mean_logit[part] = _softmax_stats(z, labels[part], vocab_start, group)
            logprob[part] = target - log_normaliser[part]
            entropy[part] = log_normaliser[part] - mean_logit[part]
        ctx.save_for_backward(hidden, weight, labels, log_normaliser, mean_logit)
        ctx.vocab_size, ctx.temperature, ctx.group, ctx.chunk_size = vocab_size, temperature, group, chunk_size
        ctx.vocab_start = vocab_start
        ctx.set_materialize_grads(False)
        return logprob, entropy

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        hidden, weight, labels, log_normaliser, mean_logit = ctx.saved_tensors
        grad_hidden = torch.zeros_like(hidden, dtype=torch.float32)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            part = slice(start, start + ctx.chunk_size)
            z = _chunk_logits(hidden[part], weight, ctx.vocab_start, ctx.vocab_size, ctx.temperature)
            grad_z = _logit_grad(
                z,
                labels[part],
                ctx.vocab_start,
                log_normaliser[part],
                mean_logit[part],
                None if grad_logprob is None else grad_logprob[part],
                None if grad_entropy is None else grad_entropy[part],
                ctx.temperature,
            )
            _accumulate_linear_grads(grad_z, hidden, weight, part, grad_hidden, grad_weight)
        _all_reduce(grad_hidden, dist.ReduceOp.SUM, ctx.group)
        return grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), None, None, None, None, None


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
