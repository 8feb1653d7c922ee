"""How a step's optimiser updates become its metrics (hand-computed)."""

import pytest

from megatron_dapo.trainer import _update_metrics


def _update(clip_high: float, loss: float) -> dict[str, float]:
    return {"actor/pg_loss": loss, "actor/ppo_kl": loss / 10, "pg_clipfrac/high": clip_high, "pg_clipfrac/low": 0.0,
            "pg_clipfrac/dual": 0.0, "prob/up_clipped_mean": 0.1 if clip_high else 0.0}


def test_clip_metrics_skip_the_first_update_whose_ratio_is_one():
    """The first update starts from the weights π_old was computed with: nothing can clip there, so the clip
    metrics average the later updates only; every other metric averages all of them."""
    metrics = _update_metrics([_update(0.0, 1.0), _update(0.02, 2.0), _update(0.04, 3.0)])
    assert metrics["pg_clipfrac/high"] == pytest.approx(0.03)
    assert metrics["prob/up_clipped_mean"] == pytest.approx(0.1)
    assert metrics["actor/pg_loss"] == pytest.approx(2.0) and metrics["actor/ppo_kl"] == pytest.approx(0.2)


def test_one_update_per_step_clips_nothing():
    assert _update_metrics([_update(0.0, 1.0)])["pg_clipfrac/high"] == 0.0
