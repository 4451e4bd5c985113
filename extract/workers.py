"""Worker processes that die with their parent from their first instant.

A spawned worker used to ask the kernel for a parent-death signal (``PR_SET_PDEATHSIG``) in
the DataLoader's ``worker_init_fn``, which runs only after the worker has unpickled its
arguments, and that imports torch (10-20 s on a loaded machine). A parent killed in that window
was never signalled, and the workers ran on forever, reparented to init, holding the run's
stdout. Here the signal is set while the worker unpickles itself, before anything else is
imported (this module imports only the standard library), and the worker then checks that its
parent is still the process that started it: a parent that died before the signal was set
is caught by that check, with no window left.

Workers also unpickle only what decoding needs (``extract.clips`` and this module), not the
backbone, timm or the store.

On Linux only; elsewhere PyTorch's own watchdog ends an orphaned worker within seconds.
"""
from __future__ import annotations

import ctypes
import multiprocessing.context
import os
import pickle
import queue as queue_module
import signal
import sys

PR_SET_PDEATHSIG = 1
# A command that stops (Ctrl-C, SIGTERM, an error) kills its workers at once; semaphores of
# their queues can then be left to multiprocessing's resource tracker, which removes them and
# warns about each after the command's one line. Removing them is its job; the warnings are
# noise. The tracker takes its warning filters from the command line it is started with.
QUIET_TRACKER = "ignore::UserWarning:multiprocessing.resource_tracker"


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies; exit now if it already has."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != parent_pid:  # reparented: the parent died before the signal was set
        os._exit(1)


def _rebuild(parent_pid: int, state: bytes):
    """Unpickled first in the worker: the signal, then the process (and its heavy imports).
    Ctrl-C reaches the whole process group; the main process handles it and its workers end
    with it, so a worker ignores it rather than print a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent_pid)
    process = object.__new__(SpawnProcess)
    process.__dict__.update(pickle.loads(state))
    return process


class SpawnProcess(multiprocessing.context.SpawnProcess):
    """A spawned process whose pickled form sets the parent-death signal before its payload
    (target and arguments) is unpickled: the payload travels as bytes inside it."""

    def __reduce__(self):
        from multiprocessing.reduction import ForkingPickler

        # Pickled while the parent spawns the child, so queues and pipes reduce as for spawn.
        return _rebuild, (os.getpid(), bytes(ForkingPickler.dumps(self.__dict__)))


class SpawnContext(multiprocessing.context.SpawnContext):
    """The spawn start method with :class:`SpawnProcess`; give it to a DataLoader as its
    ``multiprocessing_context``, and create the queues workers share with it. Creating one
    starts the resource tracker quiet (see ``QUIET_TRACKER``) unless it already runs."""

    Process = SpawnProcess

    def __init__(self):
        from multiprocessing import resource_tracker

        if QUIET_TRACKER not in sys.warnoptions:
            sys.warnoptions.append(QUIET_TRACKER)
        resource_tracker.ensure_running()


class QueueFeed:
    """Videos for DataLoader workers, read from a queue the main process fills with claimed videos.

    A worker never blocks on an empty queue: the DataLoader returns items in worker order, so
    the main process may be waiting for exactly this worker and would never refill the queue.
    After ``IDLE_SECONDS`` without a video it yields None (an ``idle`` item), and the main
    process claims one more video. A ``STOP`` ends the worker. It lives here, not in
    pipeline.py, so that a worker unpickling it imports nothing heavy (pipeline.py imports the
    backbone, timm and the store).
    """

    STOP = "stop"
    IDLE_SECONDS = 0.05

    def __init__(self, queue):
        self.queue = queue

    def __iter__(self):
        while True:
            try:
                item = self.queue.get(timeout=self.IDLE_SECONDS)
            except queue_module.Empty:
                yield None
                continue
            if item == self.STOP:
                return
            yield item
