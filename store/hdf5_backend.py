"""The HDF5 layout (``--format hdf5``): one ``.h5`` file with the Zarr layout's hierarchy.

```
STORE.h5                 root attribute "losa_tal" (JSON string); group /videos
  /videos/<name>         attributes "record" (JSON string), then "complete" = True
  /videos/<name>/last, layer_<i>, times     chunked along T, fletcher32 checksums, NaN fill
STORE.h5.writers/        staging files, claims, the publish lock (safe to delete when no writer runs)
```

HDF5 has no journal: a process killed while it has the file open for writing can leave the file's
internal index inconsistent. So writers never hold the file open while they compute. Each video
is written to its own side file in ``STORE.h5.writers/staging``; publishing copies it into the
main file under an exclusive lock, flushes, and only then sets ``complete`` (the critical
section is the copy of one video, milliseconds). A crash before the copy leaves the main file
untouched; a crash after the flush leaves an incomplete group that readers ignore and the next
writer replaces. Only a crash inside HDF5's own metadata write could damage the file; a writer
notices that its predecessor died inside the critical section (a marker file) and checks the
file before it writes, and ``store verify`` reads every byte through the checksums.

Readers open the file for each read under a shared lock, so they see only complete videos while
writers append, and never a handle that went stale under them (opening costs well under 1 ms).
"""
from __future__ import annotations

import contextlib
import json
import os
import uuid

import numpy as np

from losa_tal import input_error

from . import locks

ROOT_META_KEY = "losa_tal"
VIDEOS = "videos"
STAGED_GROUP = "video"
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _h5py():
    import h5py

    return h5py


class Hdf5Backend:
    format = "hdf5"
    renames = False

    def __init__(self, location, writable: bool):
        self.location = os.path.abspath(str(location))
        self._writers = self.location + ".writers"
        self._publish_lock = os.path.join(self._writers, "publish.lock")
        self._publishing_marker = os.path.join(self._writers, "publishing")
        self._handle = None
        self._complete = {}
        self._staging = None

    # -- creation --------------------------------------------------------------------------------
    @classmethod
    def create_or_open(cls, location, meta: dict) -> "Hdf5Backend":
        path = os.path.abspath(str(location))
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            building = f"{path}.creating-{uuid.uuid4().hex[:12]}"
            try:
                with _h5py().File(building, "w", locking=False) as handle:
                    handle.attrs[ROOT_META_KEY] = json.dumps(meta)
                    handle.create_group(VIDEOS)
                try:
                    os.link(building, path)  # unlike rename, never replaces a racing writer's file
                except FileExistsError:
                    pass
            finally:
                locks.remove_path(building)
        return cls(path, writable=True)

    @staticmethod
    def is_store(location) -> bool:
        try:
            with open(str(location), "rb") as handle:
                return handle.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE
        except OSError:
            return False

    def read_meta(self):
        with self.reading():
            raw = self._handle.attrs.get(ROOT_META_KEY)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except (TypeError, ValueError):
            return "not JSON"

    # -- reading ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def reading(self):
        """The file, open for the block, under a shared lock: a writer publishes only between
        reads, so the handle never sees a half-updated index (nested blocks share the handle)."""
        if self._handle is not None:
            yield
            return
        with locks.shared_if_present(self._publish_lock):
            self._handle = _h5py().File(self.location, "r", locking=False)
            try:
                yield
            finally:
                self._handle.close()
                self._handle = None

    def complete_videos(self) -> dict:
        with self.reading():
            for name in self._handle[VIDEOS]:
                self._remember_if_complete(name)
        return dict(self._complete)

    def record(self, name: str):
        if name not in self._complete:
            with self.reading():
                self._remember_if_complete(name)
        return self._complete.get(name)

    def _remember_if_complete(self, name):
        if name in self._complete:
            return
        group = self._handle[VIDEOS].get(name)
        if group is None or not _is_marked_complete(group):
            return
        try:
            record = json.loads(group.attrs["record"])
        except (KeyError, TypeError, ValueError):
            record = None
        self._complete[name] = record if isinstance(record, dict) else {"complete": True}

    def array(self, name: str, key: str):
        """The dataset (valid inside ``reading()`` only), or None."""
        group = self._handle[VIDEOS].get(name)
        dataset = None if group is None else group.get(key)
        return dataset if isinstance(dataset, _h5py().Dataset) else None

    def incomplete_videos(self) -> list[str]:
        with self.reading():
            names = list(self._handle[VIDEOS])
        return sorted(set(names) - set(self.complete_videos()))

    def interrupted_publish(self):
        """The video whose publication was cut short by a dead writer, or None."""
        try:
            with open(self._publishing_marker, encoding="utf-8") as handle:
                return handle.read()
        except FileNotFoundError:
            return None

    # -- writing ---------------------------------------------------------------------------------
    @property
    def claims_dir(self):
        return os.path.join(self._writers, "claims")

    def begin(self, name: str) -> "Hdf5Staging":
        if self._staging is None:
            self._staging = locks.StagingArea(os.path.join(self._writers, "staging"))
        return Hdf5Staging(self._staging.new_path(".h5"), lambda path: self._publish(name, path))

    def _publish(self, name: str, staged: str) -> bool:
        with locks.exclusive(self._publish_lock):
            self._check_after_interrupted_publish()
            with open(self._publishing_marker, "w", encoding="utf-8") as marker:
                marker.write(name)
            with _h5py().File(self.location, "a", locking=False) as main, \
                    _h5py().File(staged, "r", locking=False) as source:
                videos = main[VIDEOS]
                existing = videos.get(name)
                if existing is not None and _is_marked_complete(existing):
                    published = False  # another writer was first: keep theirs
                else:
                    if existing is not None:
                        del videos[name]  # left by a writer killed mid-publish
                    main.copy(source[STAGED_GROUP], videos, name=name)
                    main.flush()
                    videos[name].attrs["complete"] = True
                    published = True
            os.unlink(self._publishing_marker)
        locks.remove_path(staged)
        return published

    def _check_after_interrupted_publish(self):
        """A previous writer died inside the critical section: make sure the file still reads."""
        name = self.interrupted_publish()
        if name is None:
            return
        try:
            with _h5py().File(self.location, "r", locking=False) as handle:
                for group in handle[VIDEOS].values():
                    for dataset in group.values():
                        _ = dataset.shape, dataset.dtype
        except Exception as err:  # any failure here means the index is damaged
            raise input_error(self.location, f"a writer died or failed while publishing video "
                              f"'{name}' and the file's index is damaged ({err}); `store verify` "
                              "lists what is still readable") from None
        os.unlink(self._publishing_marker)

    def remove_stale(self) -> int:
        return locks.remove_stale(os.path.join(self._writers, "staging"))

    def close(self):
        if self._staging is not None:
            self._staging.close()
            self._staging = None


def _is_marked_complete(group) -> bool:
    value = group.attrs.get("complete")
    return isinstance(value, (bool, np.bool_)) and bool(value)


class Hdf5Staging:
    """One video written to its own side file; ``publish`` copies it into the store."""

    def __init__(self, path: str, publish):
        self._path, self._publish = path, publish
        self._file = _h5py().File(path, "w", locking=False)
        self._group = self._file.create_group(STAGED_GROUP)

    def create_array(self, key: str, shape, dtype, chunks):
        if key in self._group:
            del self._group[key]
        self._group.create_dataset(key, shape=shape, dtype=dtype, chunks=chunks,
                                   fillvalue=np.nan, fletcher32=True)

    def write(self, key: str, start: int, values: np.ndarray):
        self._group[key][start:start + len(values)] = values

    def read(self, key: str) -> np.ndarray:
        return self._group[key][...]

    def publish(self, record: dict) -> bool:
        self._group.attrs["record"] = json.dumps(record)
        self._file.close()
        return self._publish(self._path)

    def discard(self):
        if self._file.id.valid:
            self._file.close()
        locks.remove_path(self._path)
