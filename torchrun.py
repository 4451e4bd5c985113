"""The one torchrun helper: what torchrun tells each process, the process's device, and joining
or leaving its process group. Extraction and training both use it.

torchrun describes a process in environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``); a process started without torchrun has none and is rank 0 of a world of
one. Reading them needs no torch, so command-line code can ask cheaply; torch loads only in the
functions that need it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Launch:
    """Where this process sits among the ones torchrun started."""

    rank: int = 0  # across all nodes
    world_size: int = 1
    local_rank: int = 0  # on this node: the index of the GPU it uses
    local_world_size: int = 1  # processes on this node (they share its memory)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launch() -> Launch:
    """This process's place, from torchrun's environment variables (a world of one without)."""
    def read(name: str, default: int) -> int:
        return int(os.environ.get(name, default))

    return Launch(rank=read("RANK", 0), world_size=read("WORLD_SIZE", 1),
                  local_rank=read("LOCAL_RANK", 0),
                  local_world_size=max(1, read("LOCAL_WORLD_SIZE", 1)))


def local_gpu():
    """This process's GPU: ``cuda:LOCAL_RANK``, one GPU per process on a node."""
    import torch

    return torch.device("cuda", launch().local_rank)


def use_device(device):
    """Make a CUDA device the process's current one (a no-op for others) and return it, so that
    implicit allocations (pinned-memory threads, NCCL) of a rank go to its own GPU rather than
    each making a context on GPU 0."""
    import torch

    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def join(backend: str, timeout=None) -> bool:
    """Join the process group torchrun describes; True when this call joined one (under
    torchrun with several processes, and not joined before). ``timeout``: a ``timedelta`` for
    every collective, torch's default when None."""
    import torch.distributed as dist

    if not launch().distributed or dist.is_initialized():
        return False
    options = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group(backend, **options)
    return True


def leave() -> None:
    """Leave the process group, if this process is in one."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
