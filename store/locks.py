"""Locks between the processes that share a store, built on ``flock``.

The kernel drops an ``flock`` when its process dies, however it dies, so a killed extraction never
blocks the one that resumes it, and "is this lock free?" doubles as "is its owner dead?". Lock
files that are removed on release use the classic re-check: after locking, the path must still
name the inode we locked, otherwise the previous holder deleted it while we waited and we retry.

``flock`` works on local file systems and on NFS (Linux emulates it with POSIX locks); Lustre
needs the ``flock`` mount option. Object stores have no locks at all (see docs/store.md).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import uuid
import weakref

LOCK_SUFFIX = ".lock"
# What flock raises on a file system that refuses locks (Lustre without the flock option, some
# FUSE and NFS set-ups): the lock is unavailable, not held by someone else.
NO_LOCKS = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK, errno.EINVAL}
OWNER_SEPARATOR = "--"


def acquire(path: str, blocking: bool = False, shared: bool = False) -> int | None:
    """Lock the file at ``path`` (created if absent); the descriptor, or None if it is held."""
    mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, mode)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, path):
            return fd
        os.close(fd)


def _same_file(fd: int, path: str) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


def release(fd: int, remove_path: str | None = None):
    """Unlock; with ``remove_path``, delete the lock file first (while still holding it)."""
    if remove_path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(remove_path)
    os.close(fd)


@contextlib.contextmanager
def exclusive(path: str):
    """Hold an exclusive lock on ``path`` for the block, waiting for it if need be."""
    fd = acquire(path, blocking=True)
    try:
        yield
    finally:
        release(fd)


@contextlib.contextmanager
def held_if_present(path: str, shared: bool = True):
    """Hold a lock on an existing lock file, waiting for it; nothing if there is none (no writer
    ever ran, or the store is on read-only media, where no writer can run). The file is opened
    read-only, so a user who may only read the store can still wait for its writers."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def try_claim(directory: str, name: str):
    """Yield True if this process now holds ``name`` exclusively, False if another one does."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name + LOCK_SUFFIX)
    fd = acquire(path)
    try:
        yield fd is not None
    finally:
        if fd is not None:
            release(fd, remove_path=path)


class StagingArea:
    """One writer's private corner of a shared staging directory.

    The writer holds ``<owner>.lock`` for its lifetime and names its entries
    ``<owner>--<n><suffix>``; when the lock is free its owner is dead, so any writer may delete
    those entries (``remove_stale``).
    """

    def __init__(self, directory: str):
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.owner = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        lock_path = os.path.join(directory, self.owner + LOCK_SUFFIX)
        self._count = 0
        self._finalizer = weakref.finalize(self, _close_area, directory, self.owner,
                                           acquire(lock_path), lock_path)

    def new_path(self, suffix: str = "") -> str:
        self._count += 1
        return os.path.join(self.directory, f"{self.owner}{OWNER_SEPARATOR}{self._count}{suffix}")

    def close(self):
        self._finalizer()


def _close_area(directory, owner, fd, lock_path):
    _remove_entries(directory, owner)
    release(fd, remove_path=lock_path)


def remove_stale(directory: str) -> int:
    """Delete the entries of dead writers in a staging directory; the number of entries removed."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return 0
    removed = 0
    for owner in {name[:-len(LOCK_SUFFIX)] for name in names if name.endswith(LOCK_SUFFIX)}:
        lock_path = os.path.join(directory, owner + LOCK_SUFFIX)
        fd = acquire(lock_path)
        if fd is not None:  # free: its owner is dead
            removed += _remove_entries(directory, owner)
            release(fd, remove_path=lock_path)
    # Entries whose owner lock is gone: their writer died while closing. Checked one by one,
    # because a listing may show a new writer's entry but miss its (older) lock file.
    for name in names:
        owner = name.split(OWNER_SEPARATOR)[0]
        if OWNER_SEPARATOR in name and not os.path.exists(
                os.path.join(directory, owner + LOCK_SUFFIX)):
            removed += _remove_entries(directory, owner)
    return removed


def _remove_entries(directory: str, owner: str) -> int:
    prefix = owner + OWNER_SEPARATOR
    count = 0
    for name in os.listdir(directory):
        if name.startswith(prefix):
            remove_path(os.path.join(directory, name))
            count += 1
    return count


def remove_path(path: str):
    """Delete a file or a directory tree; absent is fine."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
