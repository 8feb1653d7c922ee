"""Shared-memory regions between the processes of one host (the CPU counterpart of CUDA IPC).

Each rank owns one region, a file in ``/dev/shm`` mapped with ``torch.from_file(shared=True)``, grown when a
larger one is needed and kept mapped across calls (first-touch page faults are paid once). Names are
unlinked as soon as every reader has mapped them, so nothing is left behind in ``/dev/shm``.
"""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

SHM_DIR = Path("/dev/shm")


class SharedRegions:
    """This rank's own region and the regions of the ranks it reads from (collective methods)."""

    def __init__(self) -> None:
        self.own: torch.Tensor | None = None
        self.peers: dict[int, torch.Tensor] = {}
        self._job = None

    def publish(self, nbytes: int, readers: set[int]) -> None:
        """Ensure this rank's region holds ``nbytes``; ``readers`` map every rank's region (collective)."""
        if self._job is None:
            holder = [uuid.uuid4().hex[:12]]
            dist.broadcast_object_list(holder, src=0)
            self._job = holder[0]
        created = None
        if nbytes and (self.own is None or self.own.numel() < nbytes):
            created = SHM_DIR / f"megatron_dapo_{self._job}_{dist.get_rank()}_{uuid.uuid4().hex[:8]}"
            self.own = torch.from_file(str(created), shared=True, size=nbytes, dtype=torch.uint8)
        announced = [None] * dist.get_world_size()
        dist.all_gather_object(announced, (str(created), nbytes) if created else None)
        if dist.get_rank() in readers:
            for rank, entry in enumerate(announced):
                if entry is not None and rank != dist.get_rank():
                    path, size = entry
                    self.peers[rank] = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
        dist.barrier()
        if created is not None:
            os.unlink(created)

    def view(self, rank: int, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A typed view into ``rank``'s region at byte ``offset``."""
        nbytes = math.prod(shape) * dtype.itemsize
        region = self.own if rank == dist.get_rank() else self.peers[rank]
        return region[offset : offset + nbytes].view(dtype).view(shape)


def same_host() -> bool:
    """Whether every rank of the job runs on this host (collective)."""
    hosts = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, os.uname().nodename)
    return len(set(hosts)) == 1


class Arena:
    """A reused buffer handing out tensors for one bucket at a time (on the host, pages fault in once)."""

    ALIGN = 64

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.buffer = torch.empty(0, dtype=torch.uint8, device=self.device)
        self.used = 0

    def reserve(self, nbytes: int) -> None:
        """Make room for ``nbytes`` (plus ``ALIGN`` per tensor) and start a new bucket."""
        if self.buffer.numel() < nbytes:
            self.buffer = torch.empty(0, dtype=torch.uint8, device=self.device)  # free the old one first
            self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self.used = 0

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        start = -(-self.used // self.ALIGN) * self.ALIGN
        if start + nbytes > self.buffer.numel():
            return torch.empty(shape, dtype=dtype, device=self.device)  # larger than planned: a fresh buffer
        self.used = start + nbytes
        return self.buffer[start : start + nbytes].view(dtype).view(shape)
