"""``trainer.distributed_timeout_minutes`` reaches the default process group and megatron's
(``distributed_timeout_minutes``); the engines' groups: tests/functional/test_sglang_start.py. One fresh
process (the CPU compatibility layer is process-wide)."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow


def _timeout(group) -> timedelta:
    return group._get_backend(torch.device("cpu")).options._timeout


def _check(rank: int) -> None:
    from megatron.core import parallel_state

    from megatron_dapo.distributed import destroy_distributed, initialize_model_parallel, initialize_process_group

    initialize_process_group(timeout_minutes=7)  # plain `python`: a world of one
    initialize_model_parallel(1, 1, seed=1, timeout_minutes=7)
    groups = [dist.group.WORLD, parallel_state.get_tensor_model_parallel_group(),
              parallel_state.get_data_parallel_group(), parallel_state.get_pipeline_model_parallel_group()]
    assert [_timeout(group) for group in groups] == [timedelta(minutes=7)] * 4
    destroy_distributed()


def test_process_groups_take_the_configured_timeout():
    mp.spawn(_check, nprocs=1, join=True)
