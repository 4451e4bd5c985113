"""An in-memory copy of the training split, so that a training step costs a memcpy, not a read.

A default THUMOS step reads about 428 MB of fp16 features; from the store that takes about a
second per window, against a GPU step of tens of milliseconds. The training split of the default
ViT-g layout is about 29 GB, which fits in the memory of a GPU node. ``data.cache`` says where
the copy goes:

- ``"gpu"``: on the training device; a batch is padded there, nothing crosses PCIe per step;
- ``"pinned"``: page-locked host memory; batches are padded into pinned buffers and copied
  asynchronously;
- ``"ram"``: ordinary host memory;
- ``"none"``: read the store every step (DataLoader workers decompress and check it);
- ``"auto"`` (default): the first of gpu, pinned, ram that the split fits in (gpu and pinned
  only on CUDA), else none. The choice is printed with its reason.

The cached tensors hold exactly the bytes the store read returns (stored dtype), so a cached run
computes what an uncached one computes, bit for bit.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

import torchrun
from losa_tal import InputError

GPU_RESERVE_FRACTION = 0.25  # of the device's memory, left to activations and the optimiser
PINNED_FRACTION = 0.5  # of the available host memory: page-locked memory cannot be swapped
RAM_FRACTION = 0.75  # of the available host memory


@dataclass(frozen=True)
class CachePlan:
    kind: str  # "none", "ram", "pinned" or "gpu"
    nbytes: int
    reason: str

    def message(self) -> str:
        where = {"none": "not cached: read from the store every step", "ram": "cached in RAM",
                 "pinned": "cached in pinned host memory", "gpu": "cached on the GPU"}[self.kind]
        return f"training features: {self.nbytes / 1e9:.2f} GB, {where} ({self.reason})"


def split_bytes(store, videos, layers) -> int:
    """Bytes of every training video's last layer and ``layers`` as stored."""
    from store import LAST

    itemsize = np.dtype(store.meta["dtype"]).itemsize
    total = 0
    for vid in videos:
        info = store.video_info(vid)
        promoted = info.get("float32_layers") or []  # layers stored in float32 on overflow
        for layer in (LAST, *layers):
            width = store.feature_dim * (1 if layer == LAST else store.num_tokens)
            total += info["num_clips"] * width * (4 if layer in promoted else itemsize)
    return total


def plan_cache(requested: str, nbytes: int, device: torch.device) -> CachePlan:
    """Where the training split goes, given ``data.cache`` and the memory free right now."""
    cuda = device.type == "cuda"
    if requested in ("pinned", "gpu") and not cuda:
        raise InputError(f"data.cache: {requested!r} needs a CUDA device (this run is on "
                         f"{device}); use \"ram\" or \"auto\"")
    if requested != "auto":
        return CachePlan(requested, nbytes, f"data.cache = {requested}")
    # Each training process on this node holds its own copy.
    host = available_host_memory() // torchrun.launch().local_world_size
    budgets = []
    if cuda:
        free, total = torch.cuda.mem_get_info(device)
        budgets.append(("gpu", free - int(GPU_RESERVE_FRACTION * total), "of GPU memory free"))
        budgets.append(("pinned", int(PINNED_FRACTION * host), "of host memory per process"))
    budgets.append(("ram", int(RAM_FRACTION * host), "of host memory per process"))
    for kind, budget, what in budgets:
        if nbytes <= budget:
            return CachePlan(kind, nbytes, f"data.cache = auto; fits in {budget / 1e9:.1f} GB "
                             f"{what}")
    return CachePlan("none", nbytes, f"data.cache = auto; more than {budgets[-1][1] / 1e9:.1f} GB "
                     f"{budgets[-1][2]}")


def available_host_memory() -> int:
    """MemAvailable from /proc/meminfo (Linux), else the free physical pages."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def build_cache(store, videos, layers, kind: str, device: torch.device) -> dict | None:
    """``{video: (last [T, D], inter [L, T, K, D] or None)}`` in the stored dtype, or None."""
    from store import LAST

    if kind == "none":
        return None
    cache = {}
    for vid in videos:
        read = store.read(vid, layers=(LAST, *layers), dtype=None)
        last = torch.from_numpy(read[LAST])
        inter = torch.from_numpy(np.stack([read[i] for i in layers])) if layers else None
        cache[vid] = tuple(None if t is None else _place(t, kind, device) for t in (last, inter))
    return cache


def _place(tensor: torch.Tensor, kind: str, device: torch.device) -> torch.Tensor:
    if kind == "gpu":
        return tensor.to(device)
    if kind == "pinned":
        return tensor.pin_memory()
    return tensor
