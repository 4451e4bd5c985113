"""Data parallelism under ``torchrun``: process group set-up and the few collectives training uses.

A run started without torchrun is a world of one process and every helper here is a no-op, so the
training recipe reads the same either way.

Every tensor handed to a collective lives on ``world.device``: NCCL serves only CUDA tensors
(a CPU tensor fails with "No backend type associated with device type cpu"), and gloo, which
serves CPU tensors, would hide that mistake in every CPU test. So the helpers here move their
inputs to the rank's device themselves, and nothing else in the project calls a collective.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.distributed as dist

import torchrun


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")
    # In a process group: the collectives run (in a one-process group too, which is how
    # bench/gpu_check.py exercises NCCL on one GPU). Outside one they are no-ops.
    joined: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start(prefer_cuda: bool = True) -> World:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on GPU)."""
    use_cuda = prefer_cuda and torch.cuda.is_available()
    device = torchrun.use_device(torchrun.local_gpu() if use_cuda else torch.device("cpu"))
    if not torchrun.launch().distributed:
        return World(device=device)
    torchrun.join("nccl" if use_cuda else "gloo")
    return World(rank=dist.get_rank(), size=dist.get_world_size(), device=device, joined=True)


def stop(world: World) -> None:
    if world.joined:
        torchrun.leave()


def barrier(world: World) -> None:
    if world.joined:
        # NCCL's barrier otherwise guesses the device from the rank number.
        cuda = world.device.type == "cuda"
        dist.barrier(device_ids=[world.device.index] if cuda else None)


def sum_across(world: World, value: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes; returns a new tensor on ``world.device``."""
    value = value.detach().to(world.device, copy=True)
    if world.joined:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def gather_json(world: World, value) -> list:
    """Every process's JSON-serialisable ``value``, in rank order, on every process.

    The values travel as UTF-8 JSON bytes in uint8 tensors on the rank's device (never pickled,
    unlike ``all_gather_object``), padded to the longest.
    """
    if not world.joined:
        return [value]
    payload = torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8)
    sizes = gather_tensors(world, torch.tensor([payload.numel()], dtype=torch.int64))
    sizes = torch.cat(sizes).tolist()
    padded = torch.zeros(max(sizes), dtype=torch.uint8)
    padded[:payload.numel()] = payload
    parts = gather_tensors(world, padded)
    return [json.loads(bytes(part[:size].cpu().numpy())) for part, size in zip(parts, sizes)]


def gather_tensors(world: World, value: torch.Tensor) -> list[torch.Tensor]:
    """``value`` of every process (all of one shape and dtype), in rank order, on ``world.device``."""
    value = value.detach().to(world.device)
    if not world.joined:
        return [value]
    parts = [torch.empty_like(value) for _ in range(world.size)]
    dist.all_gather(parts, value)
    return parts
