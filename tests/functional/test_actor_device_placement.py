"""The actor's per-micro-batch loss functions (what megatron-core's schedule calls with the last stage's output)
keep every tensor on the device of their inputs: run with CUDA-device fake tensors (tests/fake_cuda.py) on an
actor built on the CPU."""

import pytest
import torch

from ..fake_cuda import fake_cuda
from ..helpers import build_actor, make_tiny_qwen2, test_config

CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize("loss_impl", ["naive", "fused"])
def test_loss_functions_return_device_tensors(megatron_world, tmp_path, loss_impl):
    make_tiny_qwen2(tmp_path, tied=False)
    actor = build_actor(test_config(**{"model.loss_impl": loss_impl, "algorithm.kl_coef": 0.1}), tmp_path)
    chunk = actor.model_chunks[0]
    with fake_cuda():
        b, s, padded = 2, 6, 128
        micro_batch = {
            "input_ids": torch.randint(0, 50, (b, s), device="cuda"),
            "labels": torch.randint(0, 50, (b, s), device="cuda"),
            "loss_mask": torch.ones(b, s, device="cuda"),
            "advantages": torch.randn(b, s, device="cuda"),
            "old_logprobs": torch.randn(b, s, device="cuda"),
            "ref_logprobs": torch.randn(b, s, device="cuda"),
            "rollout_is_weights": torch.ones(b, s, device="cuda"),
        }
        logits = torch.randn(b, s, padded, device="cuda")
        zero, count, outputs = actor._logprob_loss_func(chunk, micro_batch, logits, temperature=0.7)
        assert zero.device == CUDA and count.device == CUDA
        assert outputs["logprobs"].device == CUDA and outputs["entropy"].device == CUDA
        numerator, count, sums = actor._policy_loss_func(chunk, micro_batch, logits)
        assert numerator.device == CUDA and count.device == CUDA and all(t.device == CUDA for t in sums.values())
