"""``run_on_rank_zero`` hands rank 0's result, or its exception, to every rank (2 gloo processes)."""

import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_dapo.errors import ConfigError


def _check(rank: int, init_file: str) -> None:
    from megatron_dapo.distributed import run_on_rank_zero

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    ran_on = []

    def work():
        ran_on.append(rank)
        return {"answer": 42}

    assert run_on_rank_zero(work) == {"answer": 42}
    assert run_on_rank_zero(work, share_result=False) == ({"answer": 42} if rank == 0 else None)
    assert ran_on == ([0, 0] if rank == 0 else [])

    def fail():
        raise ConfigError("data.train_files: bad row")

    try:
        run_on_rank_zero(fail)
    except ConfigError as error:
        assert str(error) == "data.train_files: bad row"
    else:
        raise AssertionError(f"rank {rank} did not receive rank 0's error")
    dist.barrier()  # every rank is still in step after the error
    dist.destroy_process_group()


def test_result_and_error_reach_every_rank(tmp_path):
    mp.spawn(_check, args=(str(tmp_path / "rendezvous"),), nprocs=2, join=True)
