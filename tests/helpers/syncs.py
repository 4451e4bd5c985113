"""Count the host syncs a piece of PyTorch code makes: the calls after which the host must wait
for the device, because it needs a value the device computes (a scalar, the size of a
data-dependent result) or a copy it makes (to the host, or from pageable host memory).

On CUDA each such call stalls the host until every kernel queued before it has run; on the CPU
nothing waits, but the same calls would wait on a GPU. The counter records them on any device, so
a CPU test measures what a GPU run would pay. Copies between devices can only be seen where there
are two devices (a CPU run never makes one).

    with SyncCounter() as syncs:
        step()
    assert len(syncs.events) <= 1, syncs.report()
"""
from __future__ import annotations

import dataclasses
import traceback
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Python-level reads of a tensor's values: one sync each, whatever they dispatch below (a CPU
# tensor's tolist() and numpy() dispatch nothing, so only this level sees them).
READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__bool__,
         torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__,
         torch.Tensor.__array__}

# Operators whose result (or its size) depends on the values: the host waits to learn it.
VALUE_DEPENDENT = {
    aten._local_scalar_dense.default: "scalar read",
    aten.nonzero.default: "nonzero", aten.argwhere.default: "nonzero",
    aten.masked_select.default: "masked_select",
    aten._unique.default: "unique", aten._unique2.default: "unique",
    aten.unique_dim.default: "unique", aten.unique_consecutive.default: "unique",
    aten.bincount.default: "bincount", aten.equal.default: "equal",
}
MASK_INDEXED = {aten.index.Tensor: "boolean-mask indexing",
                aten.index_put.default: "boolean-mask assignment",
                aten.index_put_.default: "boolean-mask assignment",
                aten._index_put_impl_.default: "boolean-mask assignment"}
REPEAT_INTERLEAVE = {aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor}
COPIES = {aten._to_copy.default, aten.copy_.default, aten.copy.default}

HERE = Path(__file__).resolve()
TORCH_DIR = Path(torch.__file__).resolve().parent
# torch's own frames between the caller and this counter (the modes' machinery), never origins
MACHINERY = [TORCH_DIR / "_dynamo", TORCH_DIR / "utils" / "_python_dispatch.py",
             TORCH_DIR / "overrides.py"]


@dataclasses.dataclass
class SyncEvent:
    kind: str     # what forced the sync, e.g. "scalar read", "nonzero", "copy cuda:0 -> cpu"
    caller: str   # file:line of the innermost frame outside torch (the code that asked)
    origin: str   # file:line of the innermost frame of all (inside torch when torch asked)

    def __str__(self):
        inside = f" (in {self.origin})" if self.origin != self.caller else ""
        return f"{self.kind} at {self.caller}{inside}"


class SyncCounter:
    """Records every host sync made inside ``with SyncCounter() as syncs:`` into
    ``syncs.events`` (a list of SyncEvent, in order)."""

    def __init__(self):
        self.events: list[SyncEvent] = []
        self._reading = 0  # inside a Python-level read: the operators it dispatches are that read
        self._modes = (_ReadMode(self), _OperatorMode(self))

    def __enter__(self):
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        return False

    def record(self, kind: str) -> None:
        frames = [f for f in traceback.extract_stack()[:-1]
                  if not any(_within(f.filename, path) for path in [HERE, *MACHINERY])]
        outside = [f for f in frames if not _within(f.filename, TORCH_DIR)]
        place = lambda frame: f"{Path(frame.filename).resolve()}:{frame.lineno}"  # noqa: E731
        self.events.append(SyncEvent(kind, place(outside[-1] if outside else frames[-1]),
                                     place(frames[-1])))

    def report(self) -> str:
        return "\n".join(str(e) for e in self.events) or "no host sync"


def _within(filename: str, path: Path) -> bool:
    return Path(filename).resolve().is_relative_to(path)


def reads_optimizer_step_counts(event: SyncEvent) -> bool:
    """A read made inside torch.optim: AdamW's reference implementation (the trainer's on the
    CPU) keeps its step counts as host tensors and reads them, which waits for nothing on a GPU;
    the fused AdamW the trainer uses on CUDA keeps them on the device and reads none."""
    return event.origin.startswith(str(TORCH_DIR / "optim"))


class _ReadMode(TorchFunctionMode):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in READS:
            return func(*args, **kwargs)
        if not self.counter._reading:
            self.counter.record(f"{func.__name__}()")
        self.counter._reading += 1
        try:
            return func(*args, **kwargs)
        finally:
            self.counter._reading -= 1


class _OperatorMode(TorchDispatchMode):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if not self.counter._reading:
            kind = sync_kind(func, args, kwargs, result)
            if kind:
                self.counter.record(kind)
        return result


def sync_kind(func, args, kwargs, result) -> str | None:
    """Why ``func`` makes the host wait for the device, or None when it does not."""
    if func in VALUE_DEPENDENT:
        return VALUE_DEPENDENT[func]
    if func in MASK_INDEXED:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
            return MASK_INDEXED[func]
        return None
    if func in REPEAT_INTERLEAVE:
        return None if kwargs.get("output_size") is not None else "repeat_interleave"
    if func in COPIES:
        return _copy_sync(func, args, kwargs, result)
    return None


def _copy_sync(func, args, kwargs, result) -> str | None:
    """A copy to the host always waits; one to the device waits unless it is non-blocking from
    page-locked memory (from pageable memory the driver may first wait to stage it)."""
    if func is aten._to_copy.default:
        source, target = args[0], result
    else:  # copy_(self, src) and copy(self, src): src onto self's device
        target, source = args[0], args[1]
    if source.device == target.device:
        return None
    non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
    if target.device.type == "cpu" or not (non_blocking and source.is_pinned()):
        return f"copy {source.device} -> {target.device}"
    return None
