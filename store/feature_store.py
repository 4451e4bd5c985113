"""``FeatureStore``: the one object stage one writes features through and stage two reads them from.

The store trusts nothing it reads back: shapes and dtypes are checked against the root metadata
on every read and values must be finite, so a store that was edited, truncated or damaged gives an
``InputError`` naming the store and the video, never wrong features. Programming errors (a
feature array of the wrong shape, a clip range outside the video) are ``ValueError``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import warnings

import numpy as np

from losa_tal import InputError, input_error

from .errors import remote_errors, storage_errors
from .hdf5_backend import Hdf5Backend
from .locks import NO_LOCKS, try_claim
from .meta import (LAST, TIMES_KEY, array_key, checked_meta, meta_differences, new_meta,
                   video_record_problems)
from .names import HASHED_MARK, decode_video_id, encode_video_id
from .urls import check_storage_options, is_url
from .zarr_backend import ZarrBackend

PLAN = "plan"
FAILED = "failed"  # planned videos whose source could not be extracted
BACKENDS = {"zarr": ZarrBackend, "hdf5": Hdf5Backend}
HDF5_SUFFIXES = (".h5", ".hdf5")


class FeatureStore:
    """A feature store: per-video last-layer ``[T, D]`` and intermediate ``[T, K, D]`` features.

    Use ``FeatureStore.create`` to write (it creates the store or checks that an existing one
    matches) and ``FeatureStore.open`` to read.
    """

    def __init__(self, backend, meta: dict, writable: bool):
        self._backend = backend
        self.meta = meta
        self._writable = writable
        self._warned_no_claims = False

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def create(cls, path, meta: dict, format: str | None = None,
               storage_options: dict | None = None,
               single_writer: bool = False) -> "FeatureStore":
        """A writer: creates the store, or opens an existing one whose metadata matches ``meta``.
        ``storage_options`` go to the file system of a URL store (store/urls.py).
        ``single_writer`` promises that no other process writes this store meanwhile, which a
        file system that cannot create a file only if it is absent needs (see docs/store.md)."""
        location = _location(path)
        options = check_storage_options(location, storage_options)
        format = _format_for_writing(location, format)
        backend_class = BACKENDS[format]
        requested = new_meta({**meta, "format_version": backend_class.format_version})
        with storage_errors(location, "cannot create or open the store"):
            backend = backend_class.create_or_open(location, requested,
                                                   **_backend_options(options))
            stored = _read_checked_meta(backend, location)
            backend.require_writable_layout()
            if not (backend.exclusive_create or single_writer):
                raise input_error(location, "this file system cannot create a file only if it "
                                  "is absent, so two writers could overwrite each other's "
                                  "videos; write to a local or shared POSIX directory or to "
                                  "S3 (from Python, `single_writer=True` allows one writer)")
        differences = meta_differences(stored, requested)
        if differences:
            raise input_error(location, "was written with a different " + "; ".join(differences)
                              + "; write into a new store instead")
        with contextlib.suppress(OSError):  # a read-only store has nothing to clean
            backend.remove_stale()
        return cls(backend, stored, writable=True)

    @classmethod
    def open(cls, path, storage_options: dict | None = None,
             writable: bool = False) -> "FeatureStore":
        """A reader (the format is detected); ``storage_options`` as for ``create``.
        ``writable`` opens an existing store for maintenance with its own metadata."""
        location = _location(path)
        options = check_storage_options(location, storage_options)
        format = _existing_format(location)
        if format is None:
            raise input_error(location, "no such feature store")
        with storage_errors(location, "cannot read the store"):
            backend = BACKENDS[format](location, writable=writable, **_backend_options(options))
            meta = _read_checked_meta(backend, location)
        return cls(backend, meta, writable=writable)

    @classmethod
    def upgrade(cls, path, storage_options: dict | None = None) -> int | None:
        """Bring a format-1 Zarr store to format 2 in place (no data is copied); the number of
        videos carried over, or None if there was nothing to do. No writer may run meanwhile."""
        with cls.open(path, storage_options, writable=True) as fs:
            if fs.format != "zarr" or fs.meta["format_version"] != 1:
                return None
            with storage_errors(fs.path, "cannot upgrade the store"):
                return fs._backend.upgrade()

    def close(self):
        self._backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self):
        return f"FeatureStore({self.path!r}, format={self.format!r})"

    # -- description -----------------------------------------------------------------------------
    @property
    def path(self) -> str:
        return self._backend.location

    @property
    def format(self) -> str:
        return self._backend.format

    @property
    def layers(self) -> list[int]:
        return list(self.meta["layers"])

    @property
    def tokens(self):
        """The pooled token grid ``(t, h, w)``; None in a store without intermediate layers."""
        tokens = self.meta["tokens"]
        return None if tokens is None else tuple(tokens)

    @property
    def num_tokens(self) -> int:
        """K; 0 in a store without intermediate layers."""
        return 0 if self.tokens is None else math.prod(self.tokens)

    @property
    def feature_dim(self) -> int:
        return self.meta["feature_dim"]

    @property
    def stored_layers(self) -> list:
        """Every layer a video holds: ``LAST`` then the intermediate block indices."""
        return [LAST, *self.meta["layers"]]

    def layer_shape(self, layer, num_clips: int) -> tuple:
        return (num_clips, self.feature_dim) if layer == LAST else \
            (num_clips, self.num_tokens, self.feature_dim)

    # -- reading ---------------------------------------------------------------------------------
    def videos(self) -> list[str]:
        """Ids of the committed videos, sorted (videos being written are not listed). One
        listing: a record is read only for the rare id too long to be its own name."""
        with storage_errors(self.path, "cannot list the videos"):
            return sorted(self._id_of(name) for name in self._backend.committed_names())

    def _id_of(self, name: str) -> str:
        if HASHED_MARK not in name:
            return decode_video_id(name)
        return _stored_id(name, self._backend.record(name) or {})

    def __contains__(self, video_id) -> bool:
        return isinstance(video_id, str) and bool(video_id) and self._record(video_id) is not None

    def __len__(self):
        return len(self.videos())

    def prefetch(self, video_ids):
        """Read the records of these committed videos in one batch (concurrent requests on a
        URL store) instead of one request each when they are first used."""
        with storage_errors(self.path, "cannot read the store"):
            self._backend.prefetch([encode_video_id(video_id) for video_id in video_ids])

    def video_info(self, video_id: str) -> dict:
        """``{"num_clips", "fps", "num_frames", "duration", "float32_layers", ...}``."""
        record = self._checked_record(video_id)
        return {key: value for key, value in record.items() if key != "complete"}

    def feature_times(self, video_id: str) -> np.ndarray:
        """Seconds of each feature step (clip centres), float64 ``[T]``, strictly increasing."""
        record = self._checked_record(video_id)
        num_clips = record["num_clips"]
        with self._reading(video_id, TIMES_KEY):
            array = self._backend.array(encode_video_id(video_id), TIMES_KEY)
            if array is None or tuple(array.shape) != (num_clips,):
                self._refuse(video_id, f"feature times have shape "
                                       f"{None if array is None else tuple(array.shape)}, "
                                       f"expected ({num_clips},)")
            times = np.asarray(array[...], dtype=np.float64)
        if not np.isfinite(times).all():
            self._refuse(video_id, "feature times contain NaN or inf")
        if (np.diff(times) <= 0).any():
            self._refuse(video_id, "feature times are not strictly increasing")
        return times

    def read(self, video_id: str, layers=None, start: int = 0, stop: int | None = None,
             dtype=np.float32) -> dict:
        """Clips ``start:stop`` of the given layers (default: all), as ``dtype``.

        ``{LAST: [t, D], block index: [t, K, D]}``; only those layers' chunks that overlap the
        clip range are read. ``dtype=None`` keeps each layer's stored dtype (float16, or
        float32 for a layer promoted on overflow), which halves what training moves around.
        """
        record = self._checked_record(video_id)
        num_clips = record["num_clips"]
        layers = self.stored_layers if layers is None else list(layers)
        for layer in layers:
            self._check_layer(layer)
        stop = num_clips if stop is None else stop
        if not (isinstance(start, (int, np.integer)) and isinstance(stop, (int, np.integer))
                and 0 <= start <= stop <= num_clips):
            raise ValueError(f"clip range {start}:{stop} is outside video {video_id!r} "
                             f"({num_clips} clips)")
        features = {}
        with self._reading(video_id, "the store"):  # one open file for all layers (HDF5)
            for layer in layers:
                with self._reading(video_id, array_key(layer)):
                    array = self._checked_array(video_id, record, layer)
                    features[layer] = np.asarray(array[start:stop], dtype=dtype)
        for layer, values in features.items():
            if not np.isfinite(values).all():
                self._refuse(video_id, f"layer {layer} clips {start}:{stop} contain NaN or inf "
                                       "(missing or damaged chunks); run `store verify`")
        return features

    def _check_layer(self, layer):
        if isinstance(layer, str) and layer == LAST:
            return
        if not isinstance(layer, (int, np.integer)) or isinstance(layer, bool):
            raise ValueError(f"a layer is {LAST!r} or an intermediate block index, got {layer!r}")
        if int(layer) not in self.layers:
            raise input_error(self.path, f"holds no layer {layer} (it holds {LAST!r} and "
                              f"intermediate layers {self.layers})")

    def _checked_array(self, video_id, record, layer):
        """The layer's array, refused if its shape or dtype disagrees with the metadata."""
        array = self._backend.array(encode_video_id(video_id), array_key(layer))
        if array is None:
            self._refuse(video_id, f"layer {layer} is missing")
        expected_shape = self.layer_shape(layer, record["num_clips"])
        if tuple(array.shape) != expected_shape:
            self._refuse(video_id, f"layer {layer} has shape {tuple(array.shape)}, the metadata "
                                   f"says {expected_shape}")
        promoted = layer in record.get("float32_layers", [])
        expected_dtype = np.dtype("float32" if promoted else self.meta["dtype"])
        if np.dtype(array.dtype) != expected_dtype:
            self._refuse(video_id, f"layer {layer} is {np.dtype(array.dtype)}, the metadata "
                                   f"says {expected_dtype}")
        return array

    @contextlib.contextmanager
    def _reading(self, video_id, key):
        """Backend read errors (checksum mismatch, unreadable file) become InputErrors; a URL
        store's server failing is about the store, not this video (errors.RemoteFailure)."""
        try:
            with remote_errors(self.path, f"cannot read video {video_id!r}"), \
                    self._backend.reading():
                yield
        except InputError:
            raise
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            self._refuse(video_id, f"cannot read {key}: {' '.join(str(err).split())}")

    def _record(self, video_id: str):
        with storage_errors(self.path, "cannot read the store"):
            record = self._backend.record(encode_video_id(video_id))
        if record is None or _stored_id(encode_video_id(video_id), record) != video_id:
            return None
        return record

    def _checked_record(self, video_id: str) -> dict:
        record = self._record(video_id)
        if record is None:
            raise input_error(self.path, f"holds no complete video {video_id!r}")
        problems = video_record_problems(record, self.stored_layers)
        if problems:
            self._refuse(video_id, "; ".join(problems))
        return record

    def _refuse(self, video_id, problem):
        raise input_error(self.path, f"video {video_id!r}: {problem}")

    # -- writing ---------------------------------------------------------------------------------
    def video_writer(self, video_id: str, num_clips: int, info: dict):
        """A context manager writing one video; nothing is visible until ``commit(times)``.

        Check ``video_id in fs`` (under ``claim``) first: a video that is already in the store
        is never replaced, so writing it again only costs time (``commit`` returns False).
        """
        from .writer import VideoWriter

        if not self._writable:
            raise ValueError(f"{self.path} was opened for reading; use FeatureStore.create")
        return VideoWriter(self, video_id, num_clips, info)

    # -- parts of long videos (store/parts.py) ----------------------------------------------------
    @property
    def takes_parts(self) -> bool:
        """Whether videos may be written in parts here (Zarr; HDF5 takes whole videos)."""
        return self._backend.takes_parts

    def part_writer(self, video_id: str, part: int, parts: int, num_clips: int, info: dict):
        """A writer of part ``part`` of ``parts`` of a video of ``num_clips`` clips: clips
        ``store.protocol.part_range(part, parts, num_clips)``, written at their indices in the
        video; ``commit(times)`` (the whole video's) publishes the part, not the video, and
        returns False if another writer published that part first. See ``assemble``."""
        from .writer import VideoWriter

        if not self._writable:
            raise ValueError(f"{self.path} was opened for reading; use FeatureStore.create")
        if not self.takes_parts:
            raise ValueError(f"{self.path}: {self.format} stores take whole videos, not parts")
        return VideoWriter(self, video_id, num_clips, info, part=(part, parts))

    def committed_parts(self, video_ids) -> dict:
        """``{video_id: {k, ...}}``: the committed parts of these videos, in one listing."""
        from .parts import committed_parts

        with storage_errors(self.path, "cannot list the parts"):
            return committed_parts(self, video_ids)

    def assemble(self, video_id: str):
        """Commit a video written in parts once all are committed: True if this call did,
        False if it was committed already (or by a concurrent call), None while parts are
        missing."""
        from .parts import assemble

        with storage_errors(self.path, f"cannot assemble video {video_id!r}"):
            return assemble(self, video_id)

    def write_video(self, video_id: str, features: dict, times, info: dict) -> bool:
        """Write a whole video at once; False if another writer published it first."""
        num_clips = len(next(iter(features.values()), []))
        with self.video_writer(video_id, num_clips, info) as writer:
            writer.write(0, features)
            return writer.commit(times)

    @contextlib.contextmanager
    def claim(self, video_id: str, part: int | None = None):
        """Take a video (or part ``part`` of it, see ``part_writer``) for this process:
        ``with fs.claim(vid) as mine: if mine: ...``.

        Yields False while another process holds it. A claim only saves duplicate work (the
        commit decides what is stored, exactly once): it is an ``flock``, dropped by the kernel
        if this process dies, and where there are no working locks (object storage, a file
        system that refuses ``flock``) every claim succeeds, with one warning.
        """
        directory = self._backend.claims_dir
        if directory is None:
            self._warn_no_claims("object storage has no locks")
            yield True
            return
        with contextlib.ExitStack() as stack:
            try:
                name = encode_video_id(video_id) + ("" if part is None else f"@{part}")
                mine = stack.enter_context(try_claim(directory, name))
            except OSError as err:
                if err.errno not in NO_LOCKS:
                    with storage_errors(self.path, f"cannot claim video {video_id!r}"):
                        raise
                self._warn_no_claims(f"file locks are refused here ({os.strerror(err.errno)})")
                mine = True
            yield mine

    def _warn_no_claims(self, reason: str):
        if not self._warned_no_claims:
            warnings.warn(f"{self.path}: {reason}; writers may extract a video twice, and "
                          "the store keeps one copy", stacklevel=4)
            self._warned_no_claims = True

    # -- the plan: what the store should hold ----------------------------------------------------
    def planned_videos(self) -> list[dict] | None:
        """The videos recorded as planned (``{"video_id", ...}`` each, in plan order), or None."""
        parts, planned = self._read_plan()
        return planned if parts else None

    def _read_plan(self) -> tuple[list[str], list[dict]]:
        """The plan's part names and its entries (the first entry of each id), in one read."""
        with storage_errors(self.path, "cannot read the plan"):
            parts = self._backend.read_documents(PLAN)
        planned = {}
        for name, data in parts:
            entries = _plan_entries(data)
            if entries is None:
                raise input_error(self.path, f"plan part {name!r} is damaged (not a JSON list of "
                                  "videos)")
            for entry in entries:
                planned.setdefault(entry["video_id"], entry)
        return [name for name, _ in parts], list(planned.values())

    def record_plan(self, entries: list[dict]) -> list[dict]:
        """Record ``entries`` (``{"video_id", ...}`` each) as planned, those with new ids only,
        and return the whole plan: every writer, on any machine, then agrees on it."""
        for entry in entries:
            if not (isinstance(entry, dict) and isinstance(entry.get("video_id"), str)):
                raise ValueError(f"a plan entry is a dict with a 'video_id', got {entry!r}")
        if not self._writable:
            raise ValueError(f"{self.path} was opened for reading; use FeatureStore.create")
        while True:
            parts, planned = self._read_plan()
            known = {entry["video_id"] for entry in planned}
            new = [entry for entry in entries if entry["video_id"] not in known]
            if not new:
                return planned
            part = f"{max((int(name) for name in parts if name.isdigit()), default=0) + 1:06d}"
            with storage_errors(self.path, "cannot record the plan"):
                if self._backend.create_document(PLAN, part, json_bytes(new)):
                    return planned + new
            # Another writer recorded a part first: read it and add only what is still new.

    def record_failure(self, video_id: str, reason: str) -> None:
        """Record that a planned video could not be extracted (its source failed), so that
        `store verify` tells it from a video no run has reached yet. The first reason stays."""
        document = json_bytes({"video_id": video_id, "reason": reason})
        with storage_errors(self.path, f"cannot record the failure of video {video_id!r}"):
            self._backend.create_document(FAILED, encode_video_id(video_id), document)

    def failed_videos(self) -> dict:
        """``{video_id: reason}`` of the videos recorded as failed (committed ones included)."""
        with storage_errors(self.path, "cannot read the store"):
            parts = self._backend.read_documents(FAILED)
        failed = {}
        for _, data in parts:
            try:
                document = json.loads(data)
                failed[document["video_id"]] = str(document["reason"])
            except (ValueError, TypeError, KeyError):
                continue  # a damaged failure note hides nothing: the video is then "missing"
        return failed

    # -- maintenance -----------------------------------------------------------------------------
    def leftovers(self, older_than: float) -> list[tuple[str, float]]:
        """What no committed video uses and no one has written for ``older_than`` seconds."""
        with storage_errors(self.path, "cannot list the store"):
            return self._backend.leftovers(older_than)

    def remove_leftover(self, relative: str):
        with storage_errors(self.path, f"cannot remove {relative}"):
            self._backend.remove(relative)

    def commit_problem(self, video_id: str):
        """Why a listed video's commit cannot be read (None when it can)."""
        with storage_errors(self.path, "cannot read the store"):
            return self._backend.commit_problem(encode_video_id(video_id))

    def incomplete_videos(self) -> list[str]:
        """Names (encoded) of video groups without a completion marker; readers ignore them."""
        with storage_errors(self.path, "cannot list the videos"):
            return self._backend.incomplete_videos()


def _backend_options(storage_options: dict) -> dict:
    """Keyword arguments for a backend: only URL stores (Zarr) take storage options."""
    return {"storage_options": storage_options} if storage_options else {}


def _stored_id(name: str, record: dict) -> str:
    video_id = record.get("video_id")
    return video_id if isinstance(video_id, str) else name


def _location(path) -> str:
    location = os.fspath(path) if not isinstance(path, str) else path
    if not location:
        raise ValueError("a store path is required")
    return location


def _existing_format(location: str):
    """The format of the store at ``location``; None if nothing (or an empty directory) is there."""
    if is_url(location):
        return "zarr"
    if not os.path.exists(location):
        return None
    if os.path.isdir(location):
        if ZarrBackend.is_store(location):
            return "zarr"
        if not os.listdir(location):
            return None
        raise input_error(location, "is a directory but not a Zarr feature store (no zarr.json)")
    if Hdf5Backend.is_store(location):
        return "hdf5"
    raise input_error(location, "is neither a Zarr feature store directory nor an HDF5 file")


def _format_for_writing(location: str, requested):
    if requested is not None and requested not in BACKENDS:
        raise ValueError(f"format must be one of {', '.join(BACKENDS)} or None, got {requested!r}")
    if requested == "hdf5" and is_url(location):  # before: a URL is taken to be Zarr
        raise input_error(location, "HDF5 stores must be local files; use `format` zarr for URLs")
    existing = _existing_format(location)
    if existing is not None and requested is not None and existing != requested:
        raise input_error(location, f"is an existing {existing} store; cannot write it as "
                          f"{requested}")
    if existing or requested:
        return existing or requested
    return "hdf5" if location.lower().endswith(HDF5_SUFFIXES) else "zarr"


def _read_checked_meta(backend, location) -> dict:
    meta = backend.read_meta()
    if meta is None:
        raise input_error(location, "is not a LoSA-TAL feature store (no 'losa_tal' metadata)")
    return checked_meta(location, meta, backend.readable_versions)


def json_bytes(value) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _plan_entries(data: bytes):
    try:
        entries = json.loads(data)
    except ValueError:
        return None
    if isinstance(entries, list) and all(isinstance(entry, dict) and
                                         isinstance(entry.get("video_id"), str)
                                         for entry in entries):
        return entries
    return None
