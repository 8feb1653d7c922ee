"""Fixtures for in-process megatron tests: a one-process gloo world."""

import pytest
from megatron_dapo.distributed import initialize_distributed


@pytest.fixture(scope="session")
def megatron_world():
    """A world of one process (TP=PP=DP=1) shared by the session's in-process actor tests."""
    initialize_distributed(1, 1, seed=1)
    yield
