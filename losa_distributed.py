"""The one place for data parallelism under torchrun: where a process sits (rank, world size,
local rank, local world size), its device, its process group and the few collectives the
project uses. Extraction and training both use it; nothing else calls a collective.

torchrun describes a process in environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``); a process started without torchrun has none and is rank 0 of a world of
one, where every helper here is a no-op, so the recipes read the same either way. Reading the
environment needs no torch, so command-line code can ask cheaply; torch loads only in the
functions that need it.

Start-up runs in two steps, so that a slow start (reading a store, building a cache) never
makes a collective time out: :func:`agree_on_device` meets the other ranks in torchrun's
rendezvous store as soon as the process starts (a rank without CUDA among CUDA ranks is refused
there, before it would join gloo while the others join NCCL), and :func:`start` joins the process
group once the slow part is done, reusing that store.

Every tensor handed to a collective lives on ``world.device``: NCCL serves only CUDA tensors
(a CPU tensor fails with "No backend type associated with device type cpu"), and gloo, which
serves CPU tensors, would hide that mistake in every CPU test. So the helpers here move their
inputs to the rank's device themselves.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from losa_tal import InputError

if TYPE_CHECKING:
    import torch

# How long a rank waits for the others, in rendezvous and in every collective (training's
# setting, train.timeout_minutes, defaults to it).
DEFAULT_TIMEOUT_MINUTES = 30.0
DEVICE_KEY = "losa/device/"  # rendezvous-store keys: each rank's device type


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

    @property
    def node_leader(self) -> int:
        """The rank of local rank 0 on this node (torchrun numbers a node's ranks in a row)."""
        return self.rank - self.local_rank


def launch(env=os.environ) -> Launch:
    """This process's place, from torchrun's environment variables (a world of one without);
    a variable that is not a number is one line naming it."""
    def read(name: str, default: int) -> int:
        value = env.get(name, default)
        try:
            return int(value)
        except ValueError:
            raise InputError(f"{name}: expected an integer, got {value!r}") from None

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


def rank_device(prefer_cuda: bool = True):
    """This rank's GPU when CUDA is available (and preferred), else the CPU; made current."""
    import torch

    use_cuda = prefer_cuda and torch.cuda.is_available()
    return use_device(local_gpu() if use_cuda else torch.device("cpu"))


def device_line(device, what: str) -> str:
    """The line that says which device a command really uses (nothing falls back silently)."""
    import torch

    place = launch()
    rank = f"rank {place.rank}/{place.world_size}: " if place.distributed else ""
    if device.type == "cuda":
        name = f"{device} ({torch.cuda.get_device_name(device)})"
    else:
        name = f"cpu ({torch.get_num_threads()} threads)"
    return f"{rank}{what} on {name}"


SHARED_MEMORY = "/dev/shm"  # the node's shared memory: every local rank draws on it


def shared_memory_free(path=SHARED_MEMORY) -> int | None:
    """Bytes free in the shared-memory filesystem, or None where there is none to ask."""
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


# ---------------------------------------------------------------------------------------------
# Meeting the other ranks, and the process group.

_rendezvous = {}  # the store of this process's rendezvous, reused when the group is joined


def rendezvous_store(timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES):
    """torchrun's key-value store shared by every rank (met once per process), or None outside
    torchrun."""
    import datetime

    import torch.distributed as dist

    if not launch().distributed:
        return None
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if "store" not in _rendezvous:
        _rendezvous["store"], _, _ = next(dist.rendezvous("env://", timeout=timeout))
    _rendezvous["store"].set_timeout(timeout)  # every wait in it: the caller's
    return _rendezvous["store"]


def agree_on_device(device, timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> None:
    """Refuse, on every rank and in one line, a world where some ranks have CUDA and others
    not: the CPU ranks would join gloo while the others join NCCL, and wait forever."""
    store = rendezvous_store(timeout_minutes)
    if store is None:
        return
    place = launch()
    store.set(f"{DEVICE_KEY}{place.rank}", device.type)
    kinds = [store.get(f"{DEVICE_KEY}{rank}").decode() for rank in range(place.world_size)]
    without = [rank for rank, kind in enumerate(kinds) if kind != "cuda"]
    if without and len(without) < len(kinds):
        raise InputError(f"ranks {without} found no CUDA device while the other "
                         f"{len(kinds) - len(without)} ranks use CUDA; check the GPUs and "
                         "CUDA_VISIBLE_DEVICES on their nodes (or run every rank on the CPU)")


def join(backend: str, timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> bool:
    """Join the process group torchrun describes; True when this call joined one (under
    torchrun with several processes, and not joined before). ``timeout_minutes`` bounds every
    collective's wait."""
    import datetime

    import torch.distributed as dist

    if not launch().distributed or dist.is_initialized():
        return False
    place = launch()
    dist.init_process_group(backend, store=rendezvous_store(timeout_minutes), rank=place.rank,
                            world_size=place.world_size,
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    return True


def leave() -> None:
    """Leave the process group, if this process is in one."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _cpu():
    import torch

    return torch.device("cpu")


@dataclass(frozen=True)
class World:
    """A process's place in the process group, and the device its collectives use."""

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=_cpu)
    # In a process group: the collectives run (in a one-process group too, which is how
    # bench/gpu_check.py exercises NCCL on one GPU). Outside one they are no-ops.
    joined: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start(device, timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> World:
    """Join the process group torchrun describes (nccl on CUDA, gloo on the CPU), after
    :func:`agree_on_device`; a world of one outside torchrun."""
    import torch.distributed as dist

    if not launch().distributed:
        return World(device=device)
    join("nccl" if device.type == "cuda" else "gloo", timeout_minutes)
    return World(rank=dist.get_rank(), size=dist.get_world_size(), device=device, joined=True)


def stop(world: World) -> None:
    if world.joined:
        leave()


# ---------------------------------------------------------------------------------------------
# The collectives.

def barrier(world: World) -> None:
    import torch.distributed as dist

    if world.joined:
        # NCCL's barrier otherwise guesses the device from the rank number.
        cuda = world.device.type == "cuda"
        dist.barrier(device_ids=[world.device.index] if cuda else None)


def sum_across(world: World, value):
    """Sum a tensor over all processes; returns a new tensor on ``world.device``."""
    import torch.distributed as dist

    value = value.detach().to(world.device, copy=True)
    if world.joined:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def gather_json(world: World, value) -> list:
    """Every process's JSON-serialisable ``value``, in rank order, on every process.

    The values travel as UTF-8 JSON bytes in uint8 tensors on the rank's device (never pickled,
    unlike ``all_gather_object``), padded to the longest.
    """
    import torch

    if not world.joined:
        return [value]
    payload = torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8)
    sizes = gather_tensors(world, torch.tensor([payload.numel()], dtype=torch.int64))
    sizes = torch.cat(sizes).tolist()
    padded = torch.zeros(max(sizes), dtype=torch.uint8)
    padded[:payload.numel()] = payload
    parts = gather_tensors(world, padded)
    return [json.loads(bytes(part[:size].cpu().numpy())) for part, size in zip(parts, sizes)]


def gather_tensors(world: World, value) -> list:
    """``value`` of every process (all of one shape and dtype), in rank order, on
    ``world.device``."""
    import torch
    import torch.distributed as dist

    value = value.detach().to(world.device)
    if not world.joined:
        return [value]
    parts = [torch.empty_like(value) for _ in range(world.size)]
    dist.all_gather(parts, value)
    return parts
