"""Process groups (gloo + the CPU compatibility layer on CPU, NCCL on GPU), megatron's parallel_state, and
``run_on_rank_zero`` for work that one rank does for all."""

from __future__ import annotations

import ctypes
import os
import socket
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def keep_freed_host_memory() -> None:
    """Let glibc reuse freed host buffers (up to its 32 MB mmap ceiling) instead of returning them to the OS.

    CPU jobs allocate and free hundreds of MB per step and per weight sync; by default buffers above
    128 KB are fresh mappings whose pages fault in on first touch. No-op outside glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
    libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)


def _this_attempts_store(timeout: timedelta) -> dist.Store:
    """torchrun's store, with keys of this attempt only.

    Workers reach the agent's TCPStore without a per-attempt prefix (torch 2.13 ``distributed/rendezvous.py``:
    "We create a new TCPStore for every retry"), but the agent keeps one store across in-job restarts
    (``--max-restarts``): a restarted worker then reads the previous attempt's gloo addresses and fails with
    "Connection refused" (docs/pitfalls.md, 43). ``TORCHELASTIC_RESTART_COUNT`` names the attempt.
    """
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"megatron_dapo/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def job_store(prefix: str) -> dist.Store:
    """A key-value store every rank of the job reaches without a collective: the default process group's own
    (torchrun's agent store, the ``tcp://`` or ``file://`` rendezvous store), under ``prefix``. torch has no
    public accessor; ``_get_default_store`` is what ``distributed_c10d.new_group`` itself uses (torch 2.13
    ``distributed/distributed_c10d.py``)."""
    return dist.PrefixStore(prefix, dist.distributed_c10d._get_default_store())


def initialize_process_group(timeout_minutes: int = 30) -> None:
    """Join the job (torchrun/srun set ``RANK`` etc.), or create a one-process world under plain ``python``.

    ``timeout_minutes`` (``trainer.distributed_timeout_minutes``): how long a collective waits for its peers
    before it fails, instead of the backend's own default (NCCL 10 min, gloo 30 min).
    """
    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        from megatron_dapo import cpu_compat

        cpu_compat.install()
        keep_freed_host_memory()
        backend = "gloo"
    timeout = timedelta(minutes=timeout_minutes)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # torchrun: its agent hosts the store
        dist.init_process_group(backend=backend, store=_this_attempts_store(timeout), rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
    elif "RANK" in os.environ:  # srun without torchrun: rendezvous from the environment
        dist.init_process_group(backend=backend, timeout=timeout)
    else:  # plain `python`: a world of one (the environment is left untouched for child processes)
        dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                                timeout=timeout)


def initialize_model_parallel(
    tensor_model_parallel_size: int,
    pipeline_model_parallel_size: int,
    seed: int,
    virtual_pipeline_model_parallel_size: int | None = None,
    timeout_minutes: int = 30,
    expert_model_parallel_size: int = 1,
    expert_tensor_parallel_size: int | None = None,
) -> None:
    """Megatron's TP/PP/DP (and, for MoE, EP/ETP/expert-DP) groups over the joined job (with the process group's
    timeout), and its model-parallel RNG streams."""
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
            expert_model_parallel_size=expert_model_parallel_size,
            expert_tensor_parallel_size=expert_tensor_parallel_size,
            distributed_timeout_minutes=timeout_minutes,
        )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def initialize_distributed(
    tensor_model_parallel_size: int,
    pipeline_model_parallel_size: int,
    seed: int,
    virtual_pipeline_model_parallel_size: int | None = None,
    expert_model_parallel_size: int = 1,
    expert_tensor_parallel_size: int | None = None,
) -> None:
    """``initialize_process_group`` then ``initialize_model_parallel``."""
    initialize_process_group()
    initialize_model_parallel(
        tensor_model_parallel_size, pipeline_model_parallel_size, seed, virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size, expert_tensor_parallel_size=expert_tensor_parallel_size,
    )


def free_device_cache() -> None:
    """Return this rank's cached, unused GPU memory and wait for every rank to have done so (collective):
    a colocated engine allocates only once no rank still holds blocks it freed (docs/pitfalls.md, 25)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    dist.barrier()


def destroy_distributed() -> None:
    """Tear down megatron's groups and the default process group."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def is_rank_zero() -> bool:
    """Global rank 0 (also before/after the process group exists, from torchrun's ``RANK``)."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


T = TypeVar("T")


def run_on_rank_zero(work: Callable[[], T], share_result: bool = True) -> T | None:
    """Run ``work`` on global rank 0 and hand its result — or its exception — to every rank (collective).

    Passing the exception on keeps the other ranks from waiting forever on a rank that failed. With
    ``share_result=False`` only the exception travels: rank 0 gets the result, the other ranks ``None``
    (for results that cannot or should not be sent, such as an engine).
    """
    result, error = None, None
    if is_rank_zero():
        try:
            result = work()
        except Exception as exc:  # re-raised below, on every rank
            error = exc
    if dist.get_world_size() > 1:
        holder = [(result if share_result else None, error)]
        dist.broadcast_object_list(holder, src=0)
        if share_result or not is_rank_zero():
            result, error = holder[0]
    if error is not None:
        raise error
    return result


def run_on_ranks(ranks: list[int], work: Callable[[], T]) -> T | None:
    """Run ``work`` on each of ``ranks`` (its result stays local; ``None`` elsewhere) and raise the first
    exception any of them hit on every rank (collective)."""
    result, error = None, None
    if dist.get_rank() in ranks:
        try:
            result = work()
        except Exception as exc:  # re-raised below, on every rank
            error = exc
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return result
