"""Starting SGLang engines across a job of 4 gloo processes (2 engines of 2 ranks, ``build_rollout_engine``):
every rank keeps the job's NCCL/CUDA environment, and an engine that fails to start stops every rank of the job
with SGLang's error instead of leaving its group's other rank in a collective until the process-group timeout.

SGLang cannot run without CUDA: ``sglang.Engine`` is the labelled FAKE of tests/sglang_fake.py, which writes
into the calling process's environment what sglang 0.5.23's constructor writes, and fails as a scheduler
killed during start-up does; ``torch.cuda.is_available`` is FAKED to True (the factory refuses SGLang on CPU).
"""

from __future__ import annotations

import json
import os
import sys
import types
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_dapo.config import RolloutConfig
from megatron_dapo.rollout.factory import EnginePlacement, build_rollout_engine

from ..sglang_fake import SCHEDULER_DIED, fake_engine_class

pytestmark = pytest.mark.slow

WORLD, RANKS_PER_ENGINE = 4, 2
JOB_ENV = {"NCCL_CUMEM_ENABLE": "0", "NCCL_NVLS_ENABLE": "0", "CUDA_DEVICE_MAX_CONNECTIONS": "1"}  # slurm/env.sh


def _start(rank: int, init_file: str, out_dir: str, failing_host: int | None) -> None:
    # 30 s: before the fix a failed start left the group's other rank waiting until this timeout
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=30))
    os.environ.update(JOB_ENV, LOCAL_RANK=str(rank))
    sglang = types.ModuleType("sglang")  # FAKE sglang
    sglang.Engine = fake_engine_class({"w": (3,)}, fail=rank == failing_host)
    sys.modules["sglang"] = sglang
    torch.cuda.is_available = lambda: True  # FAKE: a GPU host
    rollout = RolloutConfig(engine="sglang", ranks_per_engine=RANKS_PER_ENGINE, sglang_deterministic=True)
    try:
        engine = build_rollout_engine(rollout, EnginePlacement(RANKS_PER_ENGINE, WORLD), "/models/x",
                                      SimpleNamespace(eos_token_id=1), seed=1, weights_by_sync=True, timeout_minutes=7)
        group_timeout = engine.group._get_backend(torch.device("cpu")).options._timeout  # not gloo's default
        outcome = f"started, host={engine.is_host}, group timeout={group_timeout}"
    except RuntimeError as error:
        outcome = str(error)
    env = {name: value for name, value in os.environ.items() if name.startswith(("NCCL_", "CUDA_"))}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as file:
        json.dump({"outcome": outcome, "env": env}, file)
    dist.destroy_process_group()


def _results(tmp_path, failing_host):
    mp.spawn(_start, args=(str(tmp_path / "rendezvous"), str(tmp_path), failing_host), nprocs=WORLD, join=True)
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


def test_every_rank_keeps_the_jobs_nccl_and_cuda_environment(tmp_path):
    """Deterministic inference with TP 2 is where SGLang writes NCCL_ALGO and the channel counts on the host."""
    results = _results(tmp_path, failing_host=None)
    assert [r["outcome"] for r in results] == [f"started, host={host}, group timeout=0:07:00" for host in (True, False)] * 2
    assert all(r["env"] == JOB_ENV for r in results), [r["env"] for r in results]


def test_a_failed_start_stops_every_rank_with_sglangs_error(tmp_path):
    results = _results(tmp_path, failing_host=2)  # the host of the second engine
    assert [r["outcome"] for r in results] == [SCHEDULER_DIED] * WORLD
    assert all(r["env"] == JOB_ENV for r in results)
