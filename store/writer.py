"""Writing one video: validated chunks in, one atomic publication out.

Chunking. Every array is chunked along clips only; a chunk holds whole clips (all K tokens, all D
channels), so reading clips ``a:b`` of some layers touches exactly the chunks of those layers that
overlap ``a:b``. The chunk length is the power of two that makes a chunk about ``CHUNK_BYTES``
(1 MiB), kept within ``[MIN_CHUNK_CLIPS, MAX_CHUNK_CLIPS]``: for ViT-g (D = 1408, fp16) that is
256 clips of the last layer and 64 clips of a K = 4 layer. Large enough that a training window
(ActionFormer reads up to 2304 clips) is a few sequential reads, small enough that a short window
over-reads little and object stores get reasonably sized requests.

fp16 overflow. A value beyond the fp16 range (|x| > 65504) would be stored as inf. Instead, that
layer of that video is stored in float32 (its name is listed in the video's ``float32_layers``)
with a warning: no value is ever changed, and the others stay compact. Non-finite input (NaN,
inf) is refused, because a reader could not tell it from damage.
"""
from __future__ import annotations

import warnings

import numpy as np

from losa_tal import input_error

from .errors import storage_errors
from .meta import (RESERVED_INFO_KEYS, TIMES_KEY, array_key, json_normal,
                   video_record_problems)
from .names import encode_video_id
from .protocol import part_range

CHUNK_BYTES = 1 << 20
MIN_CHUNK_CLIPS = 16
MAX_CHUNK_CLIPS = 1024
FLOAT16_MAX = float(np.finfo(np.float16).max)


def chunk_clips(bytes_per_clip: int) -> int:
    """Clips per chunk: the power of two nearest below CHUNK_BYTES / bytes_per_clip, clamped."""
    target = max(1, CHUNK_BYTES // max(1, bytes_per_clip))
    return int(min(MAX_CHUNK_CLIPS, max(MIN_CHUNK_CLIPS, 1 << (target.bit_length() - 1))))


class VideoWriter:
    """Returned by ``FeatureStore.video_writer`` and ``part_writer``; see there.

    A part writer (``part``: ``(k, parts)``, store/parts.py) holds clips ``[first, stop)`` of
    the video only, written at their clip indices in the video, and publishes a part record
    instead of the video; ``float32_layers`` start in float32 (assembly copies such parts)."""

    def __init__(self, store, video_id: str, num_clips: int, info: dict, part=None,
                 float32_layers=()):
        if not (isinstance(num_clips, (int, np.integer)) and num_clips >= 1):
            raise ValueError(f"num_clips must be a positive integer, got {num_clips!r}")
        self._store, self._video_id, self._num_clips = store, video_id, int(num_clips)
        self._first, self._stop = (0, self._num_clips) if part is None else \
            part_range(*part, self._num_clips)
        self._layers = store.stored_layers
        self._info = self._checked_info(info)
        self._float32 = list(float32_layers)
        self._written = {layer: np.zeros(self._stop - self._first, dtype=bool)
                         for layer in self._layers}
        self._finished = False
        self._staging = None
        published_as = None if part is None else \
            {"part": part[0], "parts": part[1], "clips": [self._first, self._stop]}
        with self._storage_errors():
            self._staging = store._backend.begin(encode_video_id(video_id), published_as)
            for layer in self._layers:
                self._create(layer, "float32" if layer in self._float32 else store.meta["dtype"])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self._finished:
            self.discard()
        return False

    def write(self, start: int, features: dict):
        """Clips ``start:start + n`` of any of the store's layers (``{LAST: [n, D], i: [n, K, D]}``)."""
        self._check_open()
        checked = {layer: self._checked(layer, start, values) for layer, values in features.items()}
        offset = start - self._first
        for layer, values in checked.items():
            with self._storage_errors():
                self._staging.write(array_key(layer), offset, self._fitted(layer, values))
            self._written[layer][offset:offset + len(values)] = True

    def commit(self, times) -> bool:
        """Publish the video; False if another writer published it first (theirs is kept)."""
        self._check_open()
        missing = [f"{layer} ({int((~done).sum())} clips)" for layer, done in self._written.items()
                   if not done.all()]
        if missing:
            raise ValueError(f"video {self._video_id!r}: nothing written yet for " +
                             ", ".join(missing))
        times = self._checked_times(times)
        record = {**self._info, "video_id": self._video_id, "num_clips": self._num_clips,
                  "float32_layers": self._float32}
        with self._storage_errors():
            self._staging.create_array(TIMES_KEY, (self._num_clips,), "float64",
                                       (self._num_clips,))
            self._staging.write(TIMES_KEY, 0, times)
            published = self._staging.publish(record)
        self._finished = True
        return published

    def discard(self):
        """Drop everything written so far (done automatically when the block exits early)."""
        self._finished = True
        if self._staging is not None:
            try:
                self._staging.discard()
            except OSError:
                pass  # best effort: the next writer removes what a dead one left

    # -- checks --------------------------------------------------------------------------------
    def _check_open(self):
        if self._finished:
            raise ValueError(f"video {self._video_id!r}: the writer is closed")

    def _checked(self, layer, start, values) -> np.ndarray:
        if layer not in self._written:
            raise ValueError(f"layer {layer!r} is not one of the store's layers {self._layers}")
        try:
            values = np.asarray(values)
        except (TypeError, RuntimeError) as err:
            raise ValueError(f"layer {layer}: cannot convert to a numpy array ({err})") from None
        if values.dtype.kind != "f":
            raise ValueError(f"layer {layer}: expected floating-point features, got {values.dtype}")
        expected = self._store.layer_shape(layer, len(values) if values.ndim else 0)
        if values.shape != expected or not isinstance(start, (int, np.integer)) or \
                not self._first <= start <= self._stop - len(values):
            within = f"{self._num_clips} clips" if self._stop - self._first == self._num_clips \
                else f"clips [{self._first}, {self._stop}) (a part)"
            raise ValueError(f"layer {layer}: expected clips [{start}, {start} + n) of shape "
                             f"{expected[1:]} within {within}, got shape {values.shape}")
        if not np.isfinite(values).all():
            raise input_error(self._store.path, f"video {self._video_id!r} layer {layer}: the "
                              "features contain NaN or inf (check the checkpoint and the video); "
                              "nothing was stored for this video")
        return values

    def _checked_info(self, info) -> dict:
        if not isinstance(info, dict):
            raise ValueError(f"info must be a dict, got {type(info).__name__}")
        reserved = sorted(set(info) & set(RESERVED_INFO_KEYS))
        if reserved:
            raise ValueError(f"info may not set {reserved}: the store records them itself")
        info = {"fps": None, "num_frames": None, "duration": None, **info}
        problems = video_record_problems({**info, "num_clips": self._num_clips}, self._layers)
        if problems:
            raise input_error(self._store.path, f"video {self._video_id!r}: " + "; ".join(problems))
        try:
            return json_normal(info)
        except (TypeError, ValueError) as err:
            raise ValueError(f"info is not JSON-serialisable: {err}") from None

    def _checked_times(self, times) -> np.ndarray:
        times = np.asarray(times, dtype=np.float64)
        if times.shape != (self._num_clips,):
            raise ValueError(f"video {self._video_id!r}: times have shape {times.shape}, expected "
                             f"({self._num_clips},)")
        if not np.isfinite(times).all() or (np.diff(times) <= 0).any():
            raise input_error(self._store.path, f"video {self._video_id!r}: feature times must "
                              "be finite and strictly increasing (is the video's fps valid?)")
        return times

    # -- storage -------------------------------------------------------------------------------
    def _create(self, layer, dtype):
        size = self._stop - self._first
        shape = self._store.layer_shape(layer, size)
        bytes_per_clip = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
        chunks = (max(1, min(chunk_clips(bytes_per_clip), size)), *shape[1:])
        self._staging.create_array(array_key(layer), shape, dtype, chunks)

    def _fitted(self, layer, values: np.ndarray) -> np.ndarray:
        """The values in the layer's storage dtype, switching the layer to float32 on overflow."""
        if self._store.meta["dtype"] == "float32" or layer in self._float32:
            return values.astype(np.float32, copy=False)
        if np.abs(values).max(initial=0.0) <= FLOAT16_MAX:
            return values.astype(np.float16)
        self._promote(layer)
        return values.astype(np.float32, copy=False)

    def _promote(self, layer):
        key = array_key(layer)
        written = self._staging.read(key).astype(np.float32)
        self._create(layer, "float32")
        self._staging.write(key, 0, written)
        self._float32.append(layer)
        warnings.warn(f"{self._store.path}: video {self._video_id!r} layer {layer} has values "
                      f"beyond the float16 range; that layer is stored in float32", stacklevel=4)

    def _storage_errors(self):
        """OSError while writing: drop this video's temporary data, raise an InputError."""
        return storage_errors(self._store.path, f"cannot write video {self._video_id!r}; the "
                              "videos already in the store are untouched, run again once this "
                              "is fixed", on_error=self.discard)
