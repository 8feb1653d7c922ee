"""The CPU stand-in for torch_memory_saver's ``pause``/``resume`` of the actor's memory
(``model.offload_during_rollout`` on a host without CUDA), so that the CPU toy fails where the GPU path would
read offloaded memory (docs/pitfalls.md, 35).

On a GPU, ``pause`` unmaps the physical pages of everything allocated in the region and keeps a host copy
(``enable_cpu_backup``); reading a paused tensor is an illegal memory access. Here ``pause`` copies each storage
to a host backup and resizes the original to 0 bytes, the tensors keeping their shapes: making a view of one
raises, and a kernel reading one crashes the process, as the illegal address kills a GPU job. ``resume`` gives
each storage its bytes back in place, so every tensor, view and reference to it sees exactly what it held.
"""

from __future__ import annotations

from typing import Iterable

import torch
from megatron.core.distributed import DistributedDataParallel


def lasting_tensors(modules: Iterable[torch.nn.Module], optimizer) -> list[torch.Tensor]:
    """What the actor's torch_memory_saver region holds on a GPU (everything allocated inside it).

    The modules' parameters and buffers; megatron DDP's contiguous parameter and gradient buffers (parameters
    and ``param.main_grad`` are views of them); and, per megatron optimizer (each of a ``ChainedOptimizer``'s),
    its torch optimizer's parameters (the fp32 main params of a Float16 or distributed optimizer:
    megatron-core 0.16.1 ``optimizer/optimizer.py:674-682``, ``optimizer/distrib_optimizer.py:607``), their
    gradients and their state (Adam's moments, created by the first step).
    """
    tensors: list[torch.Tensor] = []
    for module in modules:
        # DDP's ``buffers`` attribute is its list of param-and-grad buffers and hides nn.Module.buffers()
        tensors += [*module.parameters(), *torch.nn.Module.buffers(module)]
        tensors += [getattr(param, "main_grad", None) for param in module.parameters()]
        if isinstance(module, DistributedDataParallel):
            for buffer in module.buffers + module.expert_parallel_buffers:
                tensors += [buffer.param_data, buffer.grad_data]
    for leaf in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = leaf.optimizer  # None on a rank without parameters (a stub optimizer)
        if torch_optimizer is None:
            continue
        for group in torch_optimizer.param_groups:
            tensors += [tensor for param in group["params"] for tensor in (param, param.grad)]
        for state in torch_optimizer.state.values():
            tensors += [value for value in state.values() if isinstance(value, torch.Tensor)]
    return [tensor for tensor in tensors if tensor is not None]


class HostOffload:
    """Pause and resume a set of tensors' storages, shared storages once."""

    def __init__(self) -> None:
        self._backups: list[tuple[torch.UntypedStorage, torch.UntypedStorage]] = []

    def pause(self, tensors: Iterable[torch.Tensor]) -> None:
        """Copy the storages to host backups and empty them (views of a storage share it: one backup)."""
        storages: dict[int, torch.UntypedStorage] = {}
        for tensor in tensors:
            storage = tensor.untyped_storage()
            if storage.nbytes() > 0:
                storages.setdefault(storage.data_ptr(), storage)
        self._backups = [(storage, storage.clone()) for storage in storages.values()]
        for storage, _ in self._backups:
            storage.resize_(0)

    def resume(self) -> None:
        """Give every paused storage its bytes back."""
        for storage, backup in self._backups:
            storage.resize_(backup.nbytes())
            storage.copy_(backup)
        self._backups = []
