"""The Zarr v3 layout (the default): a directory, or any fsspec URL.

```
STORE/zarr.json                 root group; attributes {"losa_tal": root metadata}
STORE/videos/<name>/zarr.json   one group per video; attributes: its record, "complete": true
STORE/videos/<name>/last        [T, D]      chunked along T only
STORE/videos/<name>/layer_<i>   [T, K, D]   chunked along T only
STORE/videos/<name>/times       [T] float64 seconds
STORE/.writers/staging/         videos being written (removed when their writer dies)
STORE/.writers/claims/          one lock file per video being extracted
```
Arrays use the standard ``crc32c`` codec (a checksum per chunk, so damaged bytes are an error
rather than wrong features) and no compression: fp16 activations shrink by under 10% and a
decompressor would slow training reads.

Publication. On a local directory a video is written in ``.writers/staging`` and published by
one ``os.rename`` into ``videos/``: readers see all of it or nothing, and if two writers race, the
second rename fails and its copy is dropped. An fsspec URL (object stores cannot rename a
directory) writes straight into ``videos/<name>`` and sets ``"complete": true`` last; readers
ignore groups without it, and the next writer of that video replaces them.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import uuid

import numpy as np

from losa_tal import input_error

from . import locks
from .urls import is_url

ROOT_META_KEY = "losa_tal"
VIDEOS = "videos"
WRITERS = ".writers"
METADATA_FILE = "zarr.json"


class ZarrBackend:
    format = "zarr"

    def __init__(self, location, writable: bool, storage_options: dict | None = None):
        import zarr.storage

        self.location = str(location)
        if is_url(self.location):
            import fsspec

            options = {"auto_mkdir": True} if self.location.startswith("file://") else {}
            options.update(storage_options or {})
            try:
                self._fs, self._root = fsspec.core.url_to_fs(self.location, **options)
                self._store = zarr.storage.FsspecStore.from_url(
                    self.location, storage_options=options, read_only=not writable)
            except (ImportError, ValueError) as err:  # unknown protocol, missing driver
                raise input_error(self.location, f"cannot open this URL: {err}") from None
            # Locks need a POSIX file system; only file:// URLs have one.
            protocols = self._fs.protocol
            protocols = (protocols,) if isinstance(protocols, str) else protocols
            self._local = self._root if "file" in protocols else None
            self.renames = False
        else:
            self._fs = None
            self._root = self._local = os.path.abspath(self.location)
            self._store = zarr.storage.LocalStore(self._root, read_only=not writable)
            self.renames = True
        self._complete = {}  # name -> record; a published video never changes
        self._arrays = {}
        self._staging = None

    # -- creation --------------------------------------------------------------------------------
    @classmethod
    def create_or_open(cls, location, meta: dict,
                       storage_options: dict | None = None) -> "ZarrBackend":
        if is_url(str(location)):
            backend = cls(location, writable=True, storage_options=storage_options)
            if backend._read_root() is None:
                backend._create_root(backend._store, meta)
            return backend
        root = os.path.abspath(str(location))
        if not _has_file(root, METADATA_FILE):
            _create_local_root(root, meta)
        return cls(root, writable=True)

    @staticmethod
    def _create_root(store, meta):
        import zarr

        zarr.open_group(store, mode="w", attributes={ROOT_META_KEY: meta})
        zarr.open_group(store, path=VIDEOS, mode="w")

    @staticmethod
    def is_store(location) -> bool:
        if is_url(str(location)):
            return True  # decided when its metadata is read
        return _has_file(str(location), METADATA_FILE)

    def read_meta(self):
        """The raw root metadata (None for a Zarr group that is not a feature store)."""
        document = self._read_root()
        if document is None:
            raise input_error(self.location, "no such feature store (no readable zarr.json)")
        attributes = document.get("attributes")
        return attributes.get(ROOT_META_KEY) if isinstance(attributes, dict) else None

    # -- reading ---------------------------------------------------------------------------------
    def complete_videos(self) -> dict:
        """``{name: record}`` of every published video (checks only names not seen before)."""
        unseen = [name for name in self._list_video_names() if name not in self._complete]
        for name, document in zip(unseen, self._read_jsons(
                [f"{VIDEOS}/{name}/{METADATA_FILE}" for name in unseen])):
            self._remember_if_complete(name, document)
        return dict(self._complete)

    def record(self, name: str):
        """The record of a published video, or None."""
        if name not in self._complete:
            self._remember_if_complete(name, self._read_json(f"{VIDEOS}/{name}/{METADATA_FILE}"))
        return self._complete.get(name)

    def _remember_if_complete(self, name, document):
        attributes = (document or {}).get("attributes")
        if isinstance(attributes, dict) and attributes.get("complete") is True:
            self._complete[name] = attributes

    def array(self, name: str, key: str):
        """A published video's array (shape, dtype, slicing), or None if it has none by that key."""
        import zarr

        if (name, key) not in self._arrays:
            try:
                self._arrays[name, key] = zarr.open_array(
                    self._store, path=f"{VIDEOS}/{name}/{key}", mode="r")
            except (FileNotFoundError, KeyError, zarr.errors.NodeTypeValidationError,
                    zarr.errors.ArrayNotFoundError):
                return None
        return self._arrays[name, key]

    def reading(self):
        return contextlib.nullcontext()  # a published video never changes: nothing to guard

    def _list_video_names(self) -> list[str]:
        try:
            if self._fs is None:
                names = os.listdir(os.path.join(self._root, VIDEOS))
            else:
                names = [path.rstrip("/").rsplit("/", 1)[-1] for path in
                         self._fs.ls(f"{self._root}/{VIDEOS}", detail=False)]
        except FileNotFoundError:
            return []
        # zarr.json and its atomic-write temporaries are not videos.
        return [name for name in names if not name.startswith(METADATA_FILE)]

    def _read_root(self):
        """The root zarr.json (None if absent). Unlike other documents, a failure to fetch it
        from a URL (cannot connect, not authorised) is raised: it is not a missing store."""
        if self._fs is None:
            return self._read_json(METADATA_FILE)
        path = f"{self._root}/{METADATA_FILE}"
        found = self._fs.cat([path], on_error="return").get(path)
        if isinstance(found, FileNotFoundError):
            return None
        if isinstance(found, BaseException):
            raise found
        return _parse_json(found)

    def _read_json(self, relative: str):
        return self._read_jsons([relative])[0]

    def _read_jsons(self, relatives: list[str]) -> list:
        """Parsed JSON documents (None where absent or unreadable: a half-written marker)."""
        if not relatives:
            return []
        if self._fs is None:
            raw = [_read_file(os.path.join(self._root, path)) for path in relatives]
        else:
            paths = [f"{self._root}/{path}" for path in relatives]
            found = self._fs.cat(paths, on_error="omit")
            raw = [found.get(path) for path in paths]
        return [_parse_json(data) for data in raw]

    # -- writing ---------------------------------------------------------------------------------
    @property
    def claims_dir(self):
        return None if self._local is None else os.path.join(self._local, WRITERS, "claims")

    def begin(self, name: str) -> "ZarrStaging":
        import zarr
        import zarr.storage

        if self.renames:
            if self._staging is None:
                self._staging = locks.StagingArea(os.path.join(self._root, WRITERS, "staging"))
            path = self._staging.new_path()
            group = zarr.open_group(zarr.storage.LocalStore(path), mode="w")
            return ZarrStaging(group, lambda: self._publish_by_rename(name, path),
                               lambda: locks.remove_path(path))
        # Marker mode: an incomplete group here is a dead writer's leftover; mode "w" replaces it.
        group = zarr.open_group(self._store, path=f"{VIDEOS}/{name}", mode="w")
        return ZarrStaging(group, lambda: True,
                           lambda: self._fs.rm(f"{self._root}/{VIDEOS}/{name}", recursive=True))

    def _publish_by_rename(self, name: str, staged: str) -> bool:
        target = os.path.join(self._root, VIDEOS, name)
        for _ in range(2):
            try:
                os.rename(staged, target)
                return True
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            if self.record(name) is not None:
                locks.remove_path(staged)  # another writer published it first: keep theirs
                return False
            # An unmarked group left by a crashed marker-mode (URL) writer: replace it.
            locks.remove_path(target)
        raise OSError(errno.EEXIST, f"{target} keeps reappearing")

    def remove_stale(self) -> int:
        if self.renames:
            return locks.remove_stale(os.path.join(self._root, WRITERS, "staging"))
        return 0

    def incomplete_videos(self) -> list[str]:
        """Names under videos/ without a completion marker (only marker mode leaves them)."""
        return sorted(set(self._list_video_names()) - set(self.complete_videos()))

    def close(self):
        if self._staging is not None:
            self._staging.close()
            self._staging = None
        self._arrays.clear()


class ZarrStaging:
    """One video being written into a Zarr group; nothing is visible until ``publish``."""

    def __init__(self, group, publish, discard):
        self._group, self._publish, self._discard = group, publish, discard

    def create_array(self, key: str, shape, dtype, chunks):
        from zarr.codecs import Crc32cCodec

        # NaN fill: a chunk that was never written (or went missing) reads as NaN, which every
        # read refuses, instead of as plausible zeros.
        self._group.create_array(key, shape=shape, dtype=dtype, chunks=chunks,
                                 fill_value=np.nan, compressors=[Crc32cCodec()], overwrite=True)

    def write(self, key: str, start: int, values: np.ndarray):
        self._group[key][start:start + len(values)] = values

    def read(self, key: str) -> np.ndarray:
        return self._group[key][...]

    def publish(self, record: dict) -> bool:
        self._group.attrs.update({**record, "complete": True})
        return self._publish()

    def discard(self):
        self._discard()



def _create_local_root(root: str, meta: dict):
    """Build the root beside its final place, then rename it there: two writers creating the same
    store at once end with one store (the loser's rename fails on the non-empty directory)."""
    import zarr.storage

    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    building = os.path.join(parent, f".{os.path.basename(root)}.creating-{uuid.uuid4().hex[:12]}")
    try:
        ZarrBackend._create_root(zarr.storage.LocalStore(building), meta)
        os.rename(building, root)
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not _has_file(root, METADATA_FILE):
            raise
    finally:
        locks.remove_path(building)


def _has_file(directory: str, name: str) -> bool:
    return os.path.isfile(os.path.join(directory, name))


def _read_file(path: str):
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _parse_json(data):
    if data is None:
        return None
    try:
        document = json.loads(data)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None
