"""Device placement of the GPU path, run on this CPU-only host: the batch is moved once to the actor's device,
and everything after it creates its tensors on the device of its inputs. ``fake_cuda`` (tests/fake_cuda.py)
gives CUDA-device fake tensors; a CPU tensor meeting a CUDA one raises ``FakeTensorDeviceMismatchError``."""

from __future__ import annotations

import pytest
import torch

from megatron_dapo.algorithm import PolicyLossConfig, masked_mean, truncated_is_weights
from megatron_dapo.batch import (
    build_training_batch,
    padding_aware_micro_batches,
    split_batch,
    to_device,
    training_samples,
    unsort_rows,
)
from megatron_dapo.ops import fused_linear_logprobs_entropy, naive_logprobs_entropy, vocab_parallel_logprobs_entropy
from megatron_dapo.ops.dapo_loss import METRIC_SUM_KEYS, dapo_loss_terms
from megatron_dapo.samples import Group, RolloutSample

from ..fake_cuda import fake_cuda

B, S, V, PADDED, H = 4, 12, 37, 48, 16
CUDA = torch.device("cuda", 0)


def _cuda_batch() -> dict[str, torch.Tensor]:
    """A training batch as the trainer holds it after the move: every tensor on the GPU."""
    return {
        "input_ids": torch.randint(0, V, (B, S), device="cuda"),
        "labels": torch.randint(0, V, (B, S), device="cuda"),
        "loss_mask": torch.ones(B, S, device="cuda"),
        "advantages": torch.randn(B, S, device="cuda"),
        "old_logprobs": torch.randn(B, S, device="cuda"),
        "rollout_logprobs": torch.randn(B, S, device="cuda"),
    }


def test_the_batch_is_built_on_the_host_and_moved_whole():
    sample = RolloutSample(0, [5, 6, 1], [-0.1, -0.2, -0.3], "stop")
    batch = build_training_batch(training_samples(Group([3, 4], [sample, sample], [1.0, 0.0], [1.0, -1.0])), 0, False)
    moved = to_device(batch, torch.device("meta"))  # a real device other than the CPU
    assert set(moved) == set(batch) and all(t.device.type == "meta" for t in moved.values())
    assert all(moved[k].shape == batch[k].shape and moved[k].dtype == batch[k].dtype for k in batch)


def test_micro_batching_stays_on_the_device():
    with fake_cuda():
        batch = _cuda_batch()
        lengths = [5, 12, 3, 9]  # sample_lengths' one host copy (data-dependent: given here)
        micro, order = padding_aware_micro_batches(batch, 2, lengths=lengths)
        assert order.device == CUDA and all(t.device == CUDA for m in micro for t in m.values())
        assert [m["input_ids"].shape[1] for m in micro] == [12, 5]
        assert unsort_rows([m["loss_mask"] for m in micro], order, S).device == CUDA
        assert all(t.device == CUDA for part in split_batch(batch, 2) for t in part.values())


@pytest.mark.parametrize("op", ["naive", "fused", "fused_linear"])
def test_loss_ops_dapo_terms_and_metric_sums_stay_on_the_device(op):
    from megatron_dapo.actor.actor import metric_sums

    with fake_cuda():
        batch = _cuda_batch()
        if op == "fused_linear":
            hidden, weight = torch.randn(B, S, H, device="cuda"), torch.randn(PADDED, H, device="cuda")
            logprobs, entropy = fused_linear_logprobs_entropy(hidden, weight, batch["labels"], V, 0.7, None, 5)
        else:
            logits = torch.randn(B, S, PADDED, device="cuda")
            function = naive_logprobs_entropy if op == "naive" else vocab_parallel_logprobs_entropy
            logprobs, entropy = function(logits, batch["labels"], V, 0.7)
        assert logprobs.device == CUDA and entropy.device == CUDA
        batch["rollout_is_weights"] = truncated_is_weights(batch["old_logprobs"], batch.pop("rollout_logprobs"))
        batch["ref_logprobs"] = torch.randn(B, S, device="cuda")
        loss = PolicyLossConfig(loss_agg_mode="seq-mean-token-mean", kl_coef=0.1, norm_length=S)
        numerator, count, sums = dapo_loss_terms(logprobs, batch, loss)
        assert numerator.device == CUDA and count.device == CUDA
        assert set(sums) == set(METRIC_SUM_KEYS) and all(t.device == CUDA for t in sums.values())
        assert metric_sums([sums, sums], CUDA).device == CUDA
        assert masked_mean(entropy, batch["loss_mask"]).device == CUDA


def test_a_tensor_created_without_a_device_is_caught():
    """The harness itself: the bug class this file guards against raises here."""
    from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError

    with fake_cuda(), pytest.raises(FakeTensorDeviceMismatchError):
        torch.zeros(B, S, device="cuda") + torch.zeros(B, S)
