"""``store export`` and ``store import``: the ``[T, D]`` float32 ``.npy`` per video that
ActionFormer, OpenTAD and the published VideoMAEv2 TAL features use.

File names are the video ids encoded by :mod:`store.names` (unchanged for ordinary ids), so an
export never writes outside its directory and an import of an export gives back the same ids.
"""
from __future__ import annotations

import io
import math
import os
import warnings

import numpy as np

from losa_tal import ConfigError, input_error, write_output

from .errors import storage_errors
from .meta import LAST
from .names import decode_video_id, encode_video_id

EXPORT_BLOCK_CLIPS = 1024
NPY_SUFFIX = ".npy"


def export_features(fs, out_dir: str, layer=LAST, progress: bool = False) -> int:
    """Write one float32 ``[T, D]`` file per complete video (an intermediate layer is averaged
    over its K tokens); the number of files written."""
    from tqdm import tqdm

    with storage_errors(out_dir, "cannot create the export directory"):
        os.makedirs(out_dir, exist_ok=True)
    videos = fs.videos()
    # As a context manager the bar is closed (ending its line) even when a video fails.
    with tqdm(videos, desc="export", unit="video", disable=not progress) as bar:
        for video_id in bar:
            features = _layer_as_sequence(fs, video_id, layer)
            path = os.path.join(out_dir, encode_video_id(video_id) + NPY_SUFFIX)
            with storage_errors(path, "cannot write"):
                _save_atomically(path, features)
    return len(videos)


def _layer_as_sequence(fs, video_id, layer) -> np.ndarray:
    num_clips = fs.video_info(video_id)["num_clips"]
    sequence = np.empty((num_clips, fs.feature_dim), dtype=np.float32)
    for start in range(0, num_clips, EXPORT_BLOCK_CLIPS):
        stop = min(num_clips, start + EXPORT_BLOCK_CLIPS)
        block = fs.read(video_id, [layer], start, stop)[layer]
        sequence[start:stop] = block if layer == LAST else block.mean(axis=1)
    return sequence


def _save_atomically(path: str, array: np.ndarray):
    # Serialised in memory and written in one buffered write: numpy's own short-write error
    # ("3136 requested and 2016 written") has no errno, so a full disk could not be named.
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    write_output(path, buffer.getbuffer(), durable=True)


def import_features(source_dir: str, store_path: str, *, fps=None, clip_len=16, clip_stride=4,
                    frame_interval=1, annotations=None, format=None, dtype="float32",
                    backbone=None, progress: bool = False,
                    storage_options: dict | None = None) -> tuple[int, int]:
    """Turn a directory of ``[T, D]`` ``.npy`` files into a last-layer-only store.

    Feature times follow the clip-centre convention of the recorded protocol; each video's fps is
    its annotation's (``fps``, or ``frame / duration``) when ``annotations`` is given, else
    ``fps``. Videos already in the store are skipped, so an interrupted import resumes.
    Returns (imported, skipped).
    """
    from store.protocol import SamplingProtocol
    from tqdm import tqdm

    from .feature_store import FeatureStore

    files = _feature_files(source_dir)
    protocol = SamplingProtocol(clip_len=clip_len, clip_stride=clip_stride,
                                frame_interval=frame_interval)
    annotated = _annotated_videos(annotations) if annotations else {}
    # Every video's fps is settled before anything is written: a bad input stops the import
    # before it starts, not halfway.
    videos = []
    for path in files:
        video_id = decode_video_id(os.path.basename(path)[:-len(NPY_SUFFIX)])
        videos.append((path, video_id, _video_info(path, video_id, annotated.get(video_id),
                                                   fps, annotations)))
    meta = {"backbone": {"preset": backbone, "kwargs": {}, "checkpoint": None,
                         "random_init_seed": None},
            "protocol": protocol.to_dict(), "layers": [], "tokens": None,
            "feature_dim": int(_load_features(files[0], None).shape[1]), "dtype": dtype,
            "imported_from": os.path.abspath(source_dir)}
    imported = skipped = 0
    off_grid = []
    with FeatureStore.create(store_path, meta, format=format,
                             storage_options=storage_options) as fs, \
            tqdm(videos, desc="import", unit="video", disable=not progress) as bar:
        for path, video_id, info in bar:
            if video_id in fs:
                skipped += 1
                continue
            features = _load_features(path, fs.feature_dim)
            times = protocol.feature_times(_frames_for_clips(protocol, len(features)),
                                           info["fps"])
            if not _on_grid(protocol, info["num_frames"], len(features)):
                off_grid.append(video_id)
            fs.write_video(video_id, {LAST: features}, times, info)
            imported += 1
    if off_grid:
        warnings.warn(f"{len(off_grid)} video(s) have a number of features that the protocol "
                      f"does not give for their annotated frame count (e.g. {off_grid[0]!r}); "
                      "check --clip-len/--clip-stride", stacklevel=2)
    return imported, skipped


def _feature_files(source_dir: str) -> list[str]:
    if not os.path.isdir(source_dir):
        raise input_error(source_dir, "no such directory")
    names = sorted(name for name in os.listdir(source_dir) if name.endswith(NPY_SUFFIX))
    if not names:
        raise input_error(source_dir, "holds no .npy feature files")
    return [os.path.join(source_dir, name) for name in names]


def _load_features(path: str, feature_dim) -> np.ndarray:
    """A ``[T, D]`` float array from a .npy file; anything else is an InputError naming it."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise input_error(path, f"not a readable .npy array ({' '.join(str(err).split())})") \
            from None
    if not isinstance(array, np.ndarray) or array.dtype.kind != "f" or array.ndim != 2:
        raise input_error(path, f"expected a [T, D] floating-point array, got "
                          f"{getattr(array, 'dtype', type(array).__name__)} "
                          f"{getattr(array, 'shape', '')}")
    if len(array) == 0:
        raise input_error(path, "holds no features (0 rows)")
    if feature_dim is not None and array.shape[1] != feature_dim:
        raise input_error(path, f"has {array.shape[1]} channels, the other files {feature_dim}")
    if not np.isfinite(array).all():
        raise input_error(path, "contains NaN or inf")
    return array


def _annotated_videos(path: str) -> dict:
    """``{video_id: VideoAnnotation}`` over every subset of an annotation file."""
    from evaluation.annotations import load_annotations

    annotations = load_annotations(path)
    if not annotations.subsets:
        return annotations.videos()
    return {vid: video for subset in annotations.subsets
            for vid, video in annotations.videos(subset).items()}


def _video_info(path, video_id, annotation, default_fps, annotations_path) -> dict:
    fps, source = default_fps, None  # None: import_features's fps argument
    duration = num_frames = None
    if annotation is not None:
        duration, num_frames = annotation.duration, annotation.num_frames
        if annotation.fps:
            fps, source = annotation.fps, annotations_path
        elif num_frames and duration:
            fps, source = num_frames / duration, annotations_path
    if fps is None:
        raise input_error(path, f"no frame rate for video {video_id!r}: give `fps`, or "
                          "`annotations` with its fps (or frame count and duration)")
    if not (math.isfinite(fps) and fps > 0):
        problem = f"video {video_id!r}: frame rate {fps} is not a positive number"
        raise ConfigError("fps", problem) if source is None else input_error(source, problem)
    if num_frames is None and duration and math.isfinite(duration * fps):
        num_frames = round(duration * fps)
    return {"fps": float(fps), "num_frames": num_frames, "duration": duration,
            "source_file": os.path.basename(path)}


def _on_grid(protocol, num_frames, num_clips: int) -> bool:
    """Does the protocol give about ``num_clips`` clips for the annotated frame count?"""
    if not num_frames:
        return True  # nothing to compare with
    if num_frames > protocol.span + 2 * protocol.clip_stride * num_clips:
        return False  # far too many frames (and too many to lay out clips for)
    return abs(protocol.num_clips(num_frames, 1.0) - num_clips) <= 1


def _frames_for_clips(protocol, num_clips: int) -> int:
    """The frame count for which the protocol gives exactly ``num_clips`` full clips."""
    return protocol.span + (num_clips - 1) * protocol.clip_stride
