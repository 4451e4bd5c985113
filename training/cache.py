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

Under torchrun the copy is made once per node, not once per process: every process trains on
every video over the epochs (each epoch shuffles the whole split), so each needs all of it, but
only local rank 0 reads the store. It writes one file in ``/dev/shm`` (the system's temporary
folder where that is too small), the node's other processes map it read-only, and the file is
unlinked as soon as all of them have mapped it: the memory lives as long as the mappings, and a
run that is killed leaves no file behind. A file whose builder died before that is deleted by
the next run on the node (``store.locks.StagingArea``, the stores' convention for staging
files). The processes meet in torchrun's rendezvous store (``losa_distributed``), not in a
collective: building takes minutes, and no process-group timeout is running yet.
"""
from __future__ import annotations

import os
import tempfile
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

import losa_distributed
from losa_tal import InputError
from store import locks

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
    # A RAM cache is one copy per node; pinned memory, one per process on the node.
    host, processes = available_host_memory(), losa_distributed.launch().local_world_size
    budgets = []
    if cuda:
        free, total = torch.cuda.mem_get_info(device)
        budgets.append(("gpu", free - int(GPU_RESERVE_FRACTION * total), "of GPU memory free"))
        budgets.append(("pinned", int(PINNED_FRACTION * host) // processes,
                        f"of host memory per process ({processes} on this node)"))
    budgets.append(("ram", int(RAM_FRACTION * host), "of host memory (one copy per node)"))
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


def build_cache(store, videos, layers, kind: str, device: torch.device,
                timeout_minutes: float = losa_distributed.DEFAULT_TIMEOUT_MINUTES) -> dict | None:
    """``{video: (last [T, D], inter [L, T, K, D] or None)}`` in the stored dtype, or None."""
    if kind == "none":
        return None
    parts = layout(store, videos, layers)
    place = losa_distributed.launch()
    if place.distributed and place.local_world_size > 1:
        host = node_shared_copy(store, layers, parts, timeout_minutes)
    else:
        host = np.empty(parts[-1].end if parts else 0, np.uint8)
        fill(host, store, layers, parts)
    return {vid: tuple(None if t is None else _place(t, kind, device) for t in pair)
            for vid, pair in views(host, parts).items()}


@dataclass(frozen=True)
class Part:
    """Where one video's last layer (``inter`` False) or stacked intermediate layers live in
    the flat cache."""

    video: str
    inter: bool
    offset: int
    shape: tuple
    dtype: str

    @property
    def end(self) -> int:
        return self.offset + int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


ALIGN = 64  # bytes: every part starts on a cache line


def layout(store, videos, layers) -> list:
    """The flat cache's parts, from the store's metadata alone (every process works it out)."""
    from store import LAST

    parts, offset, stored = [], 0, store.meta["dtype"]
    for vid in videos:
        info = store.video_info(vid)
        promoted = set(info.get("float32_layers") or [])  # layers stored in float32 on overflow
        shapes = [(False, (info["num_clips"], store.feature_dim), LAST in promoted)]
        if layers:
            shapes.append((True, (len(layers), info["num_clips"], store.num_tokens,
                                  store.feature_dim), bool(promoted & set(layers))))
        for inter, shape, wide in shapes:
            part = Part(vid, inter, offset, shape, "float32" if wide else stored)
            parts.append(part)
            offset = -(-part.end // ALIGN) * ALIGN
    return parts


def fill(host: np.ndarray, store, layers, parts) -> None:
    """Read every part from the store into the flat ``host`` array."""
    from store import LAST

    cached = views(host, parts)
    for vid, (last, inter) in cached.items():
        read = store.read(vid, layers=(LAST, *layers), dtype=None)
        last.numpy()[...] = read[LAST]
        for index, layer in enumerate(layers):
            inter[index].numpy()[...] = read[layer]


def views(host: np.ndarray, parts) -> dict:
    """``{video: (last, inter or None)}`` tensors viewing ``host`` (no copy)."""
    with warnings.catch_warnings():  # a read-only mapping: nothing writes through these views
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        cached = {}
        for part in parts:
            array = host[part.offset:part.end].view(part.dtype).reshape(part.shape)
            last, inter = cached.get(part.video, (None, None))
            tensor = torch.from_numpy(array)
            cached[part.video] = (last, tensor) if part.inter else (tensor, inter)
        return cached


class CachedReads:
    """Whole-video reads served from a cache, for what reads the split once more (the channel
    statistics): no process reads the store again for them."""

    def __init__(self, store, cache: dict, layers):
        self.store, self.cache, self.layers = store, cache, list(layers)

    def __getattr__(self, name):  # everything but the features: the store's
        return getattr(self.store, name)

    def read(self, vid, layers) -> dict:
        from store import LAST

        last, inter = (None if t is None else t.cpu().numpy() for t in self.cache[vid])
        values = {LAST: last, **{layer: inter[i] for i, layer in enumerate(self.layers)}}
        return {layer: values[layer] for layer in layers}


CACHE_FOLDER = "losa-tal-cache"  # in /dev/shm, or the temporary folder


def node_shared_copy(store, layers, parts, timeout_minutes: float) -> np.ndarray:
    """The flat cache, read from the store by local rank 0 and mapped read-only by the other
    processes of the node; the file is gone once all of them have mapped it."""
    place = losa_distributed.launch()
    rendezvous = losa_distributed.rendezvous_store(timeout_minutes)
    node = f"losa/cache/{place.node_leader}"
    nbytes = parts[-1].end if parts else 0
    if place.local_rank != 0:
        path = rendezvous.get(f"{node}/path").decode()  # waits for the build
        host = np.memmap(path, np.uint8, mode="r", shape=(nbytes,)) if nbytes else \
            np.empty(0, np.uint8)
        rendezvous.add(f"{node}/mapped", 1)
        return host
    folder = os.path.join(cache_folder(nbytes), CACHE_FOLDER)
    os.makedirs(folder, exist_ok=True)
    locks.remove_stale(folder)  # files of runs killed while building
    area = locks.StagingArea(folder)
    try:
        path = area.new_path(".cache")
        host = np.memmap(path, np.uint8, mode="w+", shape=(nbytes,)) if nbytes else \
            np.empty(0, np.uint8)
        fill(host, store, layers, parts)
        if nbytes:
            host.flush()
        rendezvous.set(f"{node}/path", path)
        deadline = time.monotonic() + 60 * timeout_minutes
        while rendezvous.add(f"{node}/mapped", 0) < place.local_world_size - 1:
            if time.monotonic() > deadline:
                raise InputError(f"{path}: the other processes of this node did not map the "
                                 f"training cache within train.timeout_minutes "
                                 f"({timeout_minutes:g})")
            time.sleep(0.05)
    finally:
        area.close()  # unlinks the file; the mappings keep its memory
    return host


def cache_folder(nbytes: int) -> str:
    """/dev/shm where it has room for the copy (memory), else the temporary folder."""
    free = losa_distributed.shared_memory_free()
    enough = free is not None and free >= nbytes
    return losa_distributed.SHARED_MEMORY if enough else tempfile.gettempdir()


def _place(tensor: torch.Tensor, kind: str, device: torch.device) -> torch.Tensor:
    if kind == "gpu":
        return tensor.to(device)
    if kind == "pinned":
        return tensor.pin_memory()
    return tensor
