"""The Zarr v3 layout (the default): a directory, or any fsspec URL; many writers on many machines.

```
STORE/zarr.json                         root group; attributes {"losa_tal": root metadata}
STORE/commits/<name>                    a committed video: JSON {"video_id", "path", "record"}
STORE/attempts/<name>/<attempt>/        one writer's attempt at a video (a Zarr group):
                                        last [T, D], layer_<i> [T, K, D], times [T] float64
                                        (or at a part of one: its clips only, all the times)
STORE/parts/<name>/<k>                  a committed part k of a video extracted in parts:
                                        JSON {"video_id", "path", "record", "part", "parts",
                                        "clips"}; readers never look here (store/parts.py)
STORE/plan/<part>                       the videos the store should hold (JSON lists, in parts)
STORE/.writers/                         local scratch: claim locks, commit temporaries
```
Arrays use the standard ``crc32c`` codec (a checksum per chunk, so damaged bytes are an error
rather than wrong features) and no compression: fp16 activations shrink by under 10% and a
decompressor would slow training reads.

Commit protocol (format 2). Each attempt writes only under its own ``attempts/<name>/<attempt>``
(a name no other writer uses). The video is published by *creating* ``commits/<name>`` only if
it does not exist: ``link`` of a finished temporary on a POSIX file system (atomic on local
disks, NFS, Lustre and GPFS alike), a conditional PUT (``If-None-Match: *``) on S3. Exactly one
attempt wins; a loser deletes only its own attempt. A part of a long video is published the same
way as ``parts/<name>/<k>``, and the video, assembled from its parts, as ``commits/<name>``. Nothing else decides what is safe: locks
(``claims``) only save duplicate work, and no writer deletes another's data. Leftovers of dead
attempts are removed by ``store gc`` (by age). A file system that can create a file only if
absent neither way is refused for writing unless the caller promises to be the only writer.

Format 1 (stores written before): ``videos/<name>/`` groups published by ``rename`` and marked
``"complete": true``, safe on one machine only. They stay readable; ``store upgrade`` turns one
into format 2 in place (a commit record per complete video, no data copied).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import tempfile
import time
import uuid

import numpy as np

from losa_tal import input_error

from . import locks
from .urls import close_filesystem, is_url, open_filesystem

FORMAT_VERSION = 2
ROOT_META_KEY = "losa_tal"
COMMITS = "commits"
ATTEMPTS = "attempts"
PARTS = "parts"
LEGACY_VIDEOS = "videos"  # format 1
WRITERS = ".writers"
METADATA_FILE = "zarr.json"
# Errors of os.link that mean "this file system has no hard links" (not "the name exists").
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.ENOSYS,
             errno.EMLINK}


class ZarrBackend:
    format = "zarr"
    format_version = FORMAT_VERSION
    readable_versions = (1, FORMAT_VERSION)

    def __init__(self, location, writable: bool, storage_options: dict | None = None):
        import zarr.storage

        self.location = str(location)
        if is_url(self.location):
            options = {"auto_mkdir": True} if self.location.startswith("file://") else {}
            options.update(storage_options or {})
            try:
                self._fs, self._root = open_filesystem(self.location, options)
                store_fs, _ = open_filesystem(self.location, options, asynchronous=True)
            except (ImportError, ValueError) as err:  # unknown protocol, missing driver
                raise input_error(self.location, f"cannot open this URL: {err}") from None
            self._root = self._root.rstrip("/")
            self._store = zarr.storage.FsspecStore(store_fs, path=self._root,
                                                   read_only=not writable)
            protocols = self._fs.protocol
            protocols = (protocols,) if isinstance(protocols, str) else protocols
            # file:// URLs have a POSIX file system underneath: locks and links work there.
            self._local = self._root if "file" in protocols or "local" in protocols else None
            self._s3 = "s3" in protocols or "s3a" in protocols
        else:
            self._fs = None
            self._root = self._local = os.path.abspath(self.location)
            self._store = zarr.storage.LocalStore(self._root, read_only=not writable)
            self._s3 = False
        self.layout = None  # the store's format_version, once its metadata is read
        self._commits = {}  # name -> commit document; a committed video never changes
        self._arrays = {}
        self._exclusive = None  # can this file system create a file only if absent?

    # -- creation --------------------------------------------------------------------------------
    @classmethod
    def create_or_open(cls, location, meta: dict,
                       storage_options: dict | None = None) -> "ZarrBackend":
        if not is_url(str(location)):
            root = os.path.abspath(str(location))
            if not _has_file(root, METADATA_FILE):
                _create_local_root(root, meta)
            return cls(root, writable=True)
        backend = cls(location, writable=True, storage_options=storage_options)
        if backend._read_root() is None:
            # Created only if absent: a second writer starting at once keeps the first's root.
            backend.create_exclusive(METADATA_FILE, _root_document(meta))
        return backend

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
        meta = attributes.get(ROOT_META_KEY) if isinstance(attributes, dict) else None
        if isinstance(meta, dict):
            self.layout = meta.get("format_version")
        return meta

    # -- reading ---------------------------------------------------------------------------------
    def committed_names(self) -> list[str]:
        """Names of the committed videos: one listing (format 1: one read per new video)."""
        if self.layout == 1:
            return [name for name in self._list(LEGACY_VIDEOS) if self.record(name) is not None]
        return self._list(COMMITS)

    def record(self, name: str):
        """A committed video's record, or None (absent, or its commit is unreadable)."""
        document = self.commit_document(name)
        return None if document is None else document["record"]

    def commit_document(self, name: str):
        """``{"video_id", "path", "record"}`` of a committed video, or None."""
        if name not in self._commits:
            document = self._read_commit(name)
            if document is None:
                return None
            self._commits[name] = document
        return self._commits[name]

    def prefetch(self, names: list[str]):
        unread = [name for name in names if name not in self._commits]
        for name, data in zip(unread, self._read_bytes([self._commit_file(n) for n in unread])):
            document = self._parsed_commit(name, data)
            if document is not None:
                self._commits[name] = document

    def _commit_file(self, name: str) -> str:
        return f"{LEGACY_VIDEOS}/{name}/{METADATA_FILE}" if self.layout == 1 else \
            f"{COMMITS}/{name}"

    def _read_commit(self, name: str):
        return self._parsed_commit(name, self._read_bytes([self._commit_file(name)])[0])

    def _parsed_commit(self, name: str, data):
        if self.layout == 1:
            attributes = (_parse_json(data) or {}).get("attributes")
            if not (isinstance(attributes, dict) and attributes.get("complete") is True):
                return None
            return {"video_id": attributes.get("video_id"), "path": f"{LEGACY_VIDEOS}/{name}",
                    "record": attributes}
        document = _parse_json(data)
        if not (isinstance(document, dict) and isinstance(document.get("record"), dict)
                and _is_store_path(document.get("path"))):
            return None
        return document

    def commit_problem(self, name: str):
        """Why a listed commit cannot be used (None if it can): for ``store verify``."""
        if self.layout == 1 or self.commit_document(name) is not None:
            return None
        raw = self._read_bytes([f"{COMMITS}/{name}"])[0]
        return "its commit record is missing" if raw is None else \
            "its commit record is damaged (not a commit document)"

    def array(self, name: str, key: str):
        """A committed video's array (shape, dtype, slicing), or None if it has none by that key."""
        import zarr

        document = self.commit_document(name)
        if document is None:
            return None
        if (name, key) not in self._arrays:
            try:
                self._arrays[name, key] = zarr.open_array(
                    self._store, path=f"{document['path']}/{key}", mode="r", zarr_format=3)
            except (FileNotFoundError, KeyError, zarr.errors.NodeTypeValidationError,
                    zarr.errors.ArrayNotFoundError):
                return None
        return self._arrays[name, key]

    def reading(self):
        return contextlib.nullcontext()  # a committed video never changes: nothing to guard

    def incomplete_videos(self) -> list[str]:
        """Names with an attempt but no commit: being written, or left by a dead writer."""
        if self.layout == 1:
            return sorted(set(self._list(LEGACY_VIDEOS)) - set(self.committed_names()))
        return sorted(set(self._list(ATTEMPTS)) - set(self.committed_names()))

    # -- documents (the plan) --------------------------------------------------------------------
    def read_documents(self, folder: str) -> list[tuple[str, bytes]]:
        """``(name, content)`` of every document in ``folder``, sorted by name."""
        names = sorted(self._list(folder))
        return [(name, data) for name, data in
                zip(names, self._read_bytes([f"{folder}/{name}" for name in names]))
                if data is not None]

    def create_document(self, folder: str, name: str, data: bytes) -> bool:
        """Create ``folder/name`` only if absent; False if it exists."""
        self.require_writable_layout()
        return self.create_exclusive(f"{folder}/{name}", data)

    # -- writing ---------------------------------------------------------------------------------
    @property
    def claims_dir(self):
        return None if self._local is None else os.path.join(self._local, WRITERS, "claims")

    @property
    def exclusive_create(self) -> bool:
        """Whether this file system can create a file only if it is absent (atomically)."""
        if self._exclusive is None:
            self._exclusive = self._local is not None or (self._s3 and self._probe_conditional())
        return self._exclusive

    def require_writable_layout(self):
        if self.layout == 1:
            raise input_error(self.location, "uses the format-1 layout, which is safe for writers "
                              "on one machine only; upgrade it in place first with `losa-tal "
                              f"store upgrade {self.location}` (while no writer runs)")

    takes_parts = True

    def begin(self, name: str, part: dict | None = None) -> "ZarrStaging":
        """An attempt at video ``name``, or at one of its parts (``part``: ``{"part", "parts",
        "clips"}``, published as ``parts/<name>/<part>`` with those fields)."""
        import zarr

        self.require_writable_layout()
        attempt = f"{ATTEMPTS}/{name}/{_attempt_id()}"
        try:
            group = zarr.open_group(self._sub_store(attempt), mode="w-", zarr_format=3)
        except BaseException:
            self.remove(attempt)
            raise
        return ZarrStaging(group, lambda record: self._commit(name, attempt, record, part),
                           lambda: self.remove(attempt))

    def _commit(self, name: str, attempt: str, record: dict, part: dict | None = None) -> bool:
        document = {"video_id": record.get("video_id"), "path": attempt, "record": record,
                    **(part or {})}
        target = f"{COMMITS}/{name}" if part is None else f"{PARTS}/{name}/{part['part']}"
        if self.create_exclusive(target, json.dumps(document).encode()):
            if part is None:
                self._commits[name] = document
            return True
        self.remove(attempt)  # another attempt was committed first: keep theirs, drop ours
        return False

    # -- parts (store/parts.py) ------------------------------------------------------------------
    def committed_parts(self) -> dict[str, set]:
        """``{name: {k, ...}}`` of the committed parts: one (recursive) listing."""
        found = {}
        for relative in self._list_tree(PARTS):
            name, _, part = relative.partition("/")
            if part.isdigit():
                found.setdefault(name, set()).add(int(part))
        return found

    def part_documents(self, name: str) -> dict:
        """``{k: document}`` of a video's committed parts (an unreadable one is left out)."""
        listed = [part for part in self._list(f"{PARTS}/{name}") if part.isdigit()]
        data = self._read_bytes([f"{PARTS}/{name}/{part}" for part in listed])
        documents = {int(part): _parse_json(raw) for part, raw in zip(listed, data)}
        return {part: document for part, document in documents.items()
                if document is not None and _is_store_path(document.get("path"))
                and isinstance(document.get("record"), dict)}

    def part_array(self, document: dict, key: str):
        """An array of a committed part's attempt (``document`` from ``part_documents``)."""
        import zarr

        return zarr.open_array(self._store, path=f"{document['path']}/{key}", mode="r",
                               zarr_format=3)

    def create_exclusive(self, relative: str, data: bytes) -> bool:
        """Create a small file only if it does not exist; False if it does. Where the file
        system cannot do that atomically, check then write (only a single writer is safe; the
        store refuses concurrent writers there, see ``FeatureStore.create``)."""
        if self._local is not None:
            return _create_posix(self._local, relative, data)
        path = f"{self._root}/{relative}"
        if not self.exclusive_create:
            if self._fs.exists(path):
                return False
            self._fs.pipe_file(path, data)
            return True
        try:
            self._fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True

    def _probe_conditional(self) -> bool:
        """Does this S3-compatible server refuse a second conditional create? (Some ignore
        ``If-None-Match``; that would silently let two writers overwrite one commit.)"""
        probe = f"{self._root}/{WRITERS}/probe-{uuid.uuid4().hex}"
        try:
            self._fs.pipe_file(probe, b"", mode="create")
            try:
                self._fs.pipe_file(probe, b"", mode="create")
            except FileExistsError:
                return True
            return False
        finally:
            with contextlib.suppress(OSError):
                self._fs.rm(probe)

    def _sub_store(self, relative: str):
        """A Zarr store rooted at ``relative``: nothing is written outside it."""
        import zarr.storage

        if self._fs is None:
            return zarr.storage.LocalStore(os.path.join(self._root, relative))
        return zarr.storage.FsspecStore(self._store.fs, read_only=False,
                                        path=f"{self._store.path.rstrip('/')}/{relative}")

    def remove(self, relative: str):
        if self._fs is None:
            locks.remove_path(os.path.join(self._root, relative))
        else:
            with contextlib.suppress(FileNotFoundError):
                self._fs.rm(f"{self._root}/{relative}", recursive=True)

    def remove_stale(self) -> int:
        return 0  # never on a guess: dead attempts go through `store gc`

    # -- maintenance -----------------------------------------------------------------------------
    def leftovers(self, older_than: float) -> list[tuple[str, float]]:
        """``(path, age in seconds)`` of what no committed video uses and nothing has written
        for ``older_than`` seconds: attempts of dead or losing writers, a format-1 store's
        unmarked groups, scratch files. Newer ones may belong to a running writer."""
        committed = set(self.committed_names())
        used = {document["path"] for document in
                (self.commit_document(name) for name in committed) if document}
        split = self.committed_parts()
        # A committed part's attempt is used until its video is committed; then the part and
        # its attempt are leftovers (the video's own attempt holds a copy).
        used |= {document["path"] for name in set(split) - committed
                 for document in self.part_documents(name).values()}
        candidates = [f"{ATTEMPTS}/{name}/{attempt}" for name in self._list(ATTEMPTS)
                      for attempt in self._list(f"{ATTEMPTS}/{name}")]
        candidates += [f"{PARTS}/{name}" for name in sorted(set(split) & committed)]
        candidates += [f"{LEGACY_VIDEOS}/{name}" for name in self._list(LEGACY_VIDEOS)]
        candidates += [f"{WRITERS}/{kind}/{name}" for kind in ("tmp", "staging", "claims")
                       for name in self._list(f"{WRITERS}/{kind}")]
        now = time.time()
        found = []
        for path in candidates:
            if path in used:
                continue
            age = now - self._newest_write(path)
            if age >= older_than:
                found.append((path, age))
        return found

    def _newest_write(self, relative: str) -> float:
        if self._fs is None:
            path = os.path.join(self._root, relative)
            times = [os.lstat(path).st_mtime]
            for folder, _, files in os.walk(path):
                times += [os.lstat(os.path.join(folder, name)).st_mtime for name in files]
            return max(times)
        details = self._fs.find(f"{self._root}/{relative}", detail=True).values()
        times = [_modified(detail) for detail in details]
        return max([t for t in times if t is not None], default=time.time())

    def upgrade(self) -> int:
        """Turn a format-1 store into format 2 in place; the number of videos carried over."""
        if self.layout != 1:
            return 0
        names = self.committed_names()
        self.layout = FORMAT_VERSION  # commits are written in the new layout from here on
        for name in names:
            document = self._commits[name]
            record = {key: value for key, value in document["record"].items()
                      if key != "complete"}
            self.create_exclusive(f"{COMMITS}/{name}", json.dumps(
                {"video_id": record.get("video_id"), "path": document["path"],
                 "record": record}).encode())
        root = self._read_root()
        root["attributes"][ROOT_META_KEY]["format_version"] = FORMAT_VERSION
        self._replace(METADATA_FILE, json.dumps(root).encode())
        self._commits.clear()
        return len(names)

    def _replace(self, relative: str, data: bytes):
        if self._fs is None:
            path = os.path.join(self._root, relative)
            fd, temporary = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".upgrade-")
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(temporary, path)
        else:
            self._fs.pipe_file(f"{self._root}/{relative}", data)

    def close(self):
        self._arrays.clear()
        if self._fs is not None:
            close_filesystem(self._fs)
            close_filesystem(self._store.fs)

    # -- file-system access ----------------------------------------------------------------------
    def _list(self, relative: str) -> list[str]:
        """Entry names in a folder (one listing; a fresh one, never a cached listing)."""
        try:
            if self._fs is None:
                names = os.listdir(os.path.join(self._root, relative))
            else:
                path = f"{self._root}/{relative}"
                self._fs.invalidate_cache(path)
                names = [entry.rstrip("/").rsplit("/", 1)[-1]
                         for entry in self._fs.ls(path, detail=False)]
        except (FileNotFoundError, NotADirectoryError):
            return []
        # zarr.json (a folder's own group document) and atomic-write temporaries are not entries.
        return [name for name in names if not name.startswith(METADATA_FILE)]

    def _list_tree(self, relative: str) -> list[str]:
        """Paths of every file under a folder, relative to it (one listing on object storage)."""
        if self._fs is None:
            top = os.path.join(self._root, relative)
            return [os.path.relpath(os.path.join(folder, name), top).replace(os.sep, "/")
                    for folder, _, names in os.walk(top) for name in names]
        path = f"{self._root}/{relative}"
        self._fs.invalidate_cache(path)
        try:
            return [found[len(path) + 1:] for found in self._fs.find(path)]
        except FileNotFoundError:
            return []

    def _read_root(self):
        """The root zarr.json (None if absent). Unlike other documents, a failure to fetch it
        from a URL (cannot connect, not authorised) is raised: it is not a missing store."""
        if self._fs is None:
            return _parse_json(self._read_bytes([METADATA_FILE])[0])
        path = f"{self._root}/{METADATA_FILE}"
        found = self._fs.cat([path], on_error="return").get(path)
        if isinstance(found, FileNotFoundError):
            return None
        if isinstance(found, BaseException):
            raise found
        return _parse_json(found)

    def _read_bytes(self, relatives: list[str]) -> list:
        """Contents of small files (None where absent); URL reads go out concurrently. A read
        that failed otherwise (no answer, a server error) is raised: a commit the server did not
        deliver is not a missing video."""
        if not relatives:
            return []
        if self._fs is None:
            return [_read_file(os.path.join(self._root, path)) for path in relatives]
        paths = [f"{self._root}/{path}" for path in relatives]
        found = self._fs.cat(paths, on_error="return")
        for data in found.values():
            if isinstance(data, BaseException) and not isinstance(data, FileNotFoundError):
                raise data
        return [None if isinstance(found.get(path), BaseException) else found.get(path)
                for path in paths]


class ZarrStaging:
    """One attempt at a video, in its own Zarr group; nothing is visible until ``publish``."""

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
        return self._publish(record)

    def discard(self):
        self._discard()


def _root_document(meta: dict) -> bytes:
    return json.dumps({"zarr_format": 3, "node_type": "group",
                       "attributes": {ROOT_META_KEY: meta}}).encode()


def _create_local_root(root: str, meta: dict):
    """Build the root beside its final place, then rename it there: two writers creating the same
    store at once end with one store (the loser's rename fails on the non-empty directory)."""
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    building = os.path.join(parent, f".{os.path.basename(root)}.creating-{uuid.uuid4().hex[:12]}")
    try:
        os.makedirs(building)
        with open(os.path.join(building, METADATA_FILE), "wb") as handle:
            handle.write(_root_document(meta))
        os.rename(building, root)
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not _has_file(root, METADATA_FILE):
            raise
    finally:
        locks.remove_path(building)


def _create_posix(root: str, relative: str, data: bytes) -> bool:
    """Create ``root/relative`` with ``data`` only if absent, all at once: the content goes to a
    private temporary, then ``link`` gives it the name (atomic, and refused if the name exists,
    on NFS too). Without hard links, ``O_EXCL`` creation then writing (a crash between the two
    leaves an empty record, which readers refuse and ``store verify`` names)."""
    target = os.path.join(root, relative)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    scratch = os.path.join(root, WRITERS, "tmp")
    os.makedirs(scratch, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=scratch)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        try:
            os.link(temporary, target)
            return True
        except FileExistsError:
            return False
        except OSError as err:
            if err.errno not in _NO_LINKS:
                raise
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def _attempt_id() -> str:
    """Unique, and says which host and process made the attempt (for `store gc`)."""
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _is_store_path(path) -> bool:
    """A commit's path must stay inside the store (a damaged or hostile record cannot point out)."""
    if not isinstance(path, str) or not path:
        return False
    parts = path.split("/")
    return parts[0] in (ATTEMPTS, LEGACY_VIDEOS) and all(part not in ("", ".", "..")
                                                         for part in parts)


def _modified(detail: dict):
    value = detail.get("LastModified") or detail.get("mtime") or detail.get("created")
    if hasattr(value, "timestamp"):
        return value.timestamp()
    return float(value) if isinstance(value, (int, float)) else None


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
