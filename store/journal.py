"""An undo journal that makes appending to an HDF5 file all-or-nothing.

HDF5 has no journal of its own: a process killed while it updates a file's index can leave the
index pointing past the end of the file, and then no video in it can be listed. (We measured
it: random SIGKILLs of HDF5 writers damaged stores.) So the writer gives h5py a file object
(h5py's ``fileobj`` driver) that, before any write lands on bytes that existed when the file was
opened, appends those bytes' old content to a journal. Appending a video rewrites only a few
small index blocks in place (around a kilobyte); the video's data goes past the old end.

Crash anywhere: the journal holds the original of every byte changed so far (each record is
written before its write), so ``roll_back`` restores them and truncates the file to its old size:
the file is exactly as before the append. ``commit`` deletes the journal; that deletion is the
moment the append happens. Process crashes only: nothing is fsynced (see docs/store.md).
"""
from __future__ import annotations

import errno
import os
import struct

MAGIC = b"LTUNDO01"
HEADER = struct.Struct("<8sQ")  # magic, size of the file when the journal was started
RECORD = struct.Struct("<QQ")  # offset, length, then the old bytes


PAGE = 1 << 16  # granularity of the bytes kept in memory after a failed write


def write_all(fd: int, data, offset: int | None = None) -> None:
    """Write every byte (at ``offset``, or at the descriptor's position). A short write is not
    success: the rest is retried, and a disk that takes nothing more is ENOSPC."""
    data, done = memoryview(data).cast("B"), 0
    while done < len(data):
        written = os.write(fd, data[done:]) if offset is None else \
            os.pwrite(fd, data[done:], offset + done)
        if written <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        done += written


class FailSafeFile:
    """A file object for ``h5py.File(FailSafeFile(...))`` that never raises into HDF5.

    h5py hands an exception raised in a file-object callback back through HDF5's C code, which
    goes on calling back (flush, close) with it pending: on a full disk that was a
    ``SystemError``, pages of "Exception ignored", a segfault or a double free. Here the first
    failed write is kept as ``failure``; from then on writes go to memory instead of the disk, so
    HDF5 sees a consistent file and finishes normally, and the owner raises ``failure`` once h5py
    is done with the file (and throws the file away).
    """

    def __init__(self, path: str, mode: str = "r+b"):
        self._file = open(path, mode, buffering=0)
        self._fd = self._file.fileno()
        self._position = 0
        self.failure = None  # the OSError of the first failed write
        self._pages = {}  # page number -> bytearray, once writes are kept in memory
        self._size = 0  # the file's size as HDF5 sees it, once writes are kept in memory

    def check(self):
        """Raise the failure, if a write failed."""
        if self.failure is not None:
            raise self.failure

    # -- the file-object interface h5py uses -------------------------------------------------
    def seek(self, offset, whence=os.SEEK_SET):
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._length()}
        self._position = base[whence] + offset
        return self._position

    def tell(self):
        return self._position

    def read(self, size=-1):
        end = self._length() if size is None or size < 0 else \
            min(self._position + size, self._length())
        data = self._read_at(self._position, max(0, end - self._position))
        self._position += len(data)
        return data

    def readinto(self, buffer):
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[:len(data)] = data
        return len(data)

    def write(self, data):
        data = memoryview(data).cast("B")
        start = self._position
        if self.failure is None:
            try:
                self._before_write(start, start + len(data))
                write_all(self._fd, data, start)
            except OSError as err:
                self._fail(err)
        if self.failure is not None:
            self._keep(start, data)
        self._position = start + len(data)
        return len(data)

    def truncate(self, size=None):
        size = self._position if size is None else size
        if self.failure is None:
            try:
                self._before_truncate(size)
                os.ftruncate(self._fd, size)
            except OSError as err:
                self._fail(err)
        if self.failure is not None:
            self._size = size
            self._pages = {page: data for page, data in self._pages.items()
                           if page * PAGE < size}
        return size

    def flush(self):
        pass  # unbuffered

    @property
    def closed(self) -> bool:
        return self._file.closed

    def close(self):
        self._file.close()

    # -- hooks (JournaledFile saves old bytes here) ------------------------------------------
    def _before_write(self, start: int, end: int):
        pass

    def _before_truncate(self, size: int):
        pass

    # -- after a failure: the bytes HDF5 wrote, in memory ------------------------------------
    def _fail(self, err: OSError):
        self.failure = err
        self._size = os.fstat(self._fd).st_size

    def _length(self) -> int:
        return self._size if self.failure is not None else os.fstat(self._fd).st_size

    def _page(self, number: int) -> bytearray:
        if number not in self._pages:
            on_disk = os.pread(self._fd, PAGE, number * PAGE)
            self._pages[number] = bytearray(on_disk.ljust(PAGE, b"\0"))
        return self._pages[number]

    def _keep(self, start: int, data: memoryview):
        position, end = start, start + len(data)
        while position < end:
            number, offset = divmod(position, PAGE)
            take = min(PAGE - offset, end - position)
            self._page(number)[offset:offset + take] = data[position - start:position - start + take]
            position += take
        self._size = max(self._size, end)

    def _read_at(self, start: int, size: int) -> bytes:
        if not self._pages:
            return os.pread(self._fd, size, start)
        parts, position, end = [], start, start + size
        while position < end:
            number, offset = divmod(position, PAGE)
            take = min(PAGE - offset, end - position)
            page = self._pages.get(number)
            parts.append(bytes(page[offset:offset + take]) if page is not None else
                         os.pread(self._fd, take, position).ljust(take, b"\0"))
            position += take
        return b"".join(parts)


class JournaledFile(FailSafeFile):
    """Read/write file object for ``h5py.File(JournaledFile(...), "a")``: every byte that
    existed when it was opened is journaled before it is overwritten. After a failed write
    nothing more reaches the file (see :class:`FailSafeFile`), so each change on disk has its
    complete journal record, and ``roll_back`` restores the file."""

    def __init__(self, path: str, journal_path: str):
        self._journal_path = journal_path
        self._journal = open(journal_path, "wb", buffering=0)
        try:
            super().__init__(path)
            self._original_size = os.fstat(self._fd).st_size
            write_all(self._journal.fileno(), HEADER.pack(MAGIC, self._original_size))
        except BaseException:
            self._journal.close()
            raise

    def _before_write(self, start: int, end: int):
        self._save(start, end)

    def _before_truncate(self, size: int):
        self._save(size, self._original_size)

    def _save(self, start: int, end: int):
        """Journal the old content of ``[start, end)`` that existed when we opened the file."""
        end = min(end, self._original_size)
        if start < end:
            old = os.pread(self._fd, end - start, start)
            write_all(self._journal.fileno(), RECORD.pack(start, len(old)) + old)

    def close(self):
        super().close()
        self._journal.close()

    def commit(self):
        """The append is complete: forget the old bytes."""
        self.close()
        os.unlink(self._journal_path)


def roll_back(path: str, journal_path: str) -> bool:
    """Undo an append cut short; True if there was one. The journal is removed afterwards."""
    try:
        with open(journal_path, "rb") as handle:
            journal = handle.read()
    except FileNotFoundError:
        return False
    if len(journal) >= HEADER.size:
        magic, original_size = HEADER.unpack_from(journal)
        if magic != MAGIC:
            raise ValueError(f"{journal_path} is not an undo journal")
        with open(path, "r+b") as handle:
            # Newest first, so where a range was saved twice its original content is written last.
            for offset, old in reversed(_records(journal)):
                handle.seek(offset)
                handle.write(old)
            handle.truncate(original_size)
    # (A journal shorter than its header was cut before the file was opened: nothing to undo.)
    os.unlink(journal_path)
    return True


def _records(journal: bytes) -> list[tuple[int, bytes]]:
    records, position = [], HEADER.size
    while position + RECORD.size <= len(journal):
        offset, length = RECORD.unpack_from(journal, position)
        position += RECORD.size
        if position + length > len(journal):
            break  # cut while being written: its write never started
        records.append((offset, journal[position:position + length]))
        position += length
    return records
