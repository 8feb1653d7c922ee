"""Fused log-prob ops at TP=2 over gloo: each rank holds half the (padded) vocabulary."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_dapo.ops import fused_linear_logprobs_entropy, vocab_parallel_logprobs_entropy

from ..helpers import PADDED, VOCAB, dapo_micro_batch, loss_op_inputs, naive_dapo_loss
from ..helpers import reference_logprobs_entropy as reference

TP = 2


def _check_rank(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=TP)
    group = dist.group.WORLD
    shard = slice(rank * PADDED // TP, (rank + 1) * PADDED // TP)  # rank 1's half holds the padding
    for temperature in (1.0, 0.7):
        hidden, weight, labels, (g_lp, g_h) = loss_op_inputs(seed=4)
        ref_hidden, ref_weight = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        ref_logprob, ref_entropy = reference(ref_hidden @ ref_weight.t(), labels, temperature)
        ((ref_logprob * g_lp).sum() + (ref_entropy * g_h).sum()).backward()

        logits = (hidden @ weight[shard].t()).requires_grad_(True)
        logprob, entropy = vocab_parallel_logprobs_entropy(logits, labels, VOCAB, temperature, group)
        assert torch.allclose(logprob.double(), ref_logprob.detach(), atol=1e-5)
        assert torch.allclose(entropy.double(), ref_entropy.detach(), atol=1e-5)
        ((logprob * g_lp).sum() + (entropy * g_h).sum()).backward()
        ref_logit_grad = torch.autograd.functional.vjp(
            lambda z: (reference(z, labels, temperature)[0] * g_lp).sum() + (reference(z, labels, temperature)[1] * g_h).sum(),
            (hidden @ weight.t()).double(),
        )[1]
        assert torch.allclose(logits.grad, ref_logit_grad[..., shard].float(), atol=1e-5)

        fused_hidden = hidden.clone().requires_grad_(True)
        weight_shard = weight[shard].clone().requires_grad_(True)
        logprob, entropy = fused_linear_logprobs_entropy(fused_hidden, weight_shard, labels, VOCAB, temperature, group, chunk_size=7)
        assert torch.allclose(logprob.double(), ref_logprob.detach(), atol=1e-5)
        assert torch.allclose(entropy.double(), ref_entropy.detach(), atol=1e-5)
        ((logprob * g_lp).sum() + (entropy * g_h).sum()).backward()
        assert torch.allclose(fused_hidden.grad, ref_hidden.grad, atol=1e-5)  # all-reduced over TP
        assert torch.allclose(weight_shard.grad, ref_weight.grad[shard], atol=1e-5)
    dist.destroy_process_group()


def test_tp2_matches_full_vocabulary_reference(tmp_path):
    mp.spawn(_check_rank, args=(str(tmp_path / "rendezvous"),), nprocs=TP, join=True)


def _check_dapo_loss_rank(rank: int, init_file: str) -> None:
    from megatron_dapo.algorithm import PolicyLossConfig
    from megatron_dapo.ops.dapo_loss import fused_linear_dapo_loss_terms

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=TP)
    shard = slice(rank * PADDED // TP, (rank + 1) * PADDED // TP)
    loss = PolicyLossConfig(clip_ratio_c=3.0, kl_coef=0.1, temperature=0.7, norm_length=16)
    hidden, weight, labels, _ = loss_op_inputs(seed=7)
    batch = dapo_micro_batch(labels)
    ref_hidden, ref_weight = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref_numerator, _, _ = naive_dapo_loss(ref_hidden, ref_weight, batch, loss)
    ref_numerator.backward()
    fused_hidden, weight_shard = hidden.clone().requires_grad_(True), weight[shard].clone().requires_grad_(True)
    numerator, _, _ = fused_linear_dapo_loss_terms(fused_hidden, weight_shard, batch, loss, VOCAB, dist.group.WORLD, 5)
    numerator.backward()
    assert abs(numerator.item() - ref_numerator.item()) < 1e-5
    assert torch.allclose(fused_hidden.grad, ref_hidden.grad, atol=1e-5)
    assert torch.allclose(weight_shard.grad, ref_weight.grad[shard], atol=1e-5)
    dist.destroy_process_group()


def test_tp2_fused_linear_dapo_loss_matches_naive(tmp_path):
    mp.spawn(_check_dapo_loss_rank, args=(str(tmp_path / "rendezvous"),), nprocs=TP, join=True)
