"""The paired statistics of examples/ablation/figures.py against hand-computed t intervals."""

import importlib.util
import math
import sys

import pytest

from ..helpers import ROOT


def _figures():
    spec = importlib.util.spec_from_file_location("figures", ROOT / "examples" / "ablation" / "figures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_paired_difference_is_the_mean_difference_with_a_t_interval():
    figures = _figures()
    # differences 1, 2, 3: mean 2, sample std 1, t(0.975, 2 df) = 4.302653
    mean, low, high = figures.paired_difference([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
    half = 4.302653 / math.sqrt(3)
    assert mean == pytest.approx(2.0) and low == pytest.approx(2.0 - half, abs=1e-5)
    assert high == pytest.approx(2.0 + half, abs=1e-5)
    # the pairing matters: seeds that move together leave a tight interval around a difference of 0.1
    mean, low, high = figures.paired_difference([0.3, 0.5, 0.7, 0.9, 1.1], [0.2, 0.4, 0.6, 0.8, 1.0])
    assert mean == pytest.approx(0.1) and low == pytest.approx(0.1) and high == pytest.approx(0.1)
    assert all(math.isnan(x) for x in figures.paired_difference([1.0], [0.0])[1:])  # one seed: no interval
