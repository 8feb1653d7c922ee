"""``parallel.recompute_granularity``: recomputing activations in backward changes memory, not the step."""

import pytest
import torch

from ..helpers import build_actor, make_tiny_qwen2, test_config


def _batch(num: int = 6, width: int = 20) -> dict:
    generator = torch.Generator().manual_seed(11)
    input_ids = torch.randint(2, 50, (num, width), generator=generator)
    loss_mask = torch.zeros(num, width)
    for row in range(num):
        loss_mask[row, 2 : 5 + 2 * row] = 1
    labels = torch.cat([input_ids[:, 1:], torch.zeros(num, 1, dtype=torch.long)], dim=1)
    return {
        "input_ids": input_ids, "labels": labels, "loss_mask": loss_mask,
        "advantages": torch.randn(num, 1, generator=generator).expand(num, width).contiguous(),
        "old_logprobs": -3.0 + 0.3 * torch.randn(num, width, generator=generator),
    }


def _first_step(hf_dir, recompute: str) -> dict[str, float]:
    config = test_config(**{"parallel.recompute_granularity": recompute, "parallel.micro_batch_size": 2,
                            "optimizer.lr_warmup_steps": 0, "rollout.temperature": 1.0})
    actor = build_actor(config, hf_dir)
    assert actor.transformer_config.recompute_granularity == (None if recompute == "none" else recompute)
    return actor.train_step(_batch())


@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_recompute_gives_the_same_step(megatron_world, tmp_path, recompute):
    make_tiny_qwen2(tmp_path, tied=False)
    reference, got = _first_step(tmp_path, "none"), _first_step(tmp_path, recompute)
    for key in ("actor/pg_loss", "actor/grad_norm"):
        assert abs(got[key] - reference[key]) <= 1e-6 * max(1.0, abs(reference[key])), (key, got[key], reference[key])
