"""Data parallelism under ``torchrun``: process group set-up and the few collectives training uses.

A run started without torchrun is a world of one process and every helper here is a no-op, so the
training recipe reads the same either way.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start(prefer_cuda: bool = True) -> World:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on GPU)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = prefer_cuda and torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if size == 1:
        return World(device=device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return World(rank=dist.get_rank(), size=dist.get_world_size(), device=device)


def stop(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def sum_across(world: World, value: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes (returns a new tensor)."""
    value = value.detach().clone()
    if world.size > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value



def from_main(world: World, value: float | None) -> float:
    """The main process's float on every process (e.g. an mAP only the main process computed)."""
    if world.size == 1:
        return value
    box = torch.tensor([value if world.is_main else 0.0], dtype=torch.float64)
    dist.broadcast(box, src=0)
    return float(box.item())
