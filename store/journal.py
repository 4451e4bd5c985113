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

import os
import struct

MAGIC = b"LTUNDO01"
HEADER = struct.Struct("<8sQ")  # magic, size of the file when the journal was started
RECORD = struct.Struct("<QQ")  # offset, length, then the old bytes


class JournaledFile:
    """Read/write file object for ``h5py.File(JournaledFile(...), "a")``."""

    def __init__(self, path: str, journal_path: str):
        self._journal_path = journal_path
        self._journal = open(journal_path, "wb", buffering=0)
        self._file = open(path, "r+b", buffering=0)
        self._original_size = os.fstat(self._file.fileno()).st_size
        self._journal.write(HEADER.pack(MAGIC, self._original_size))

    # -- the file-object interface h5py uses -------------------------------------------------
    def seek(self, offset, whence=os.SEEK_SET):
        return self._file.seek(offset, whence)

    def tell(self):
        return self._file.tell()

    def read(self, size=-1):
        return self._file.read(size)

    def readinto(self, buffer):
        return self._file.readinto(buffer)

    def write(self, data):
        offset = self._file.tell()
        self._save(offset, offset + len(data))
        return self._file.write(data)

    def truncate(self, size=None):
        size = self._file.tell() if size is None else size
        self._save(size, self._original_size)
        return self._file.truncate(size)

    def flush(self):
        pass  # unbuffered

    # -- the journal -------------------------------------------------------------------------
    def _save(self, start: int, end: int):
        """Journal the old content of ``[start, end)`` that existed when we opened the file."""
        end = min(end, self._original_size)
        if start < end:
            old = os.pread(self._file.fileno(), end - start, start)
            self._journal.write(RECORD.pack(start, len(old)) + old)

    def close(self):
        self._file.close()
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
