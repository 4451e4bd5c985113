"""Decode videos into backbone-ready clips with decord, inside DataLoader workers.

Each worker takes its share of the videos and yields *chunks*: a run of consecutive clips of one
video, sent as the distinct frames they use (scaled, float32 [U, 3, S, S]) plus an index map
[n, clip_len] into those frames. Clips overlap (stride 4 < length 16), so sending frames rather
than clips moves a quarter of the bytes, and every frame is decoded and resized exactly once:
the frames a chunk shares with the next one are carried over, not decoded again. The main
process gathers the clips (on the GPU when there is one) and batches them across videos.

A video that cannot be decoded becomes a ``failed`` item naming it; the worker goes on with
the next video.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from extract.protocol import IMAGENET_MEAN, IMAGENET_STD, SamplingProtocol

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv",
                    ".wmv", ".3gp", ".ts", ".ogv")
# Raw decoded frames held at once per worker; bounds memory on 4K or 8K videos.
MAX_DECODE_BYTES = 128 * 2**20


class VideoError(Exception):
    """A video that cannot be decoded (corrupt, truncated, empty, not a video)."""


# Bit-exact scaling. The official script interpolates each clip as a [C=3, T=16, H, W] tensor,
# so PyTorch sees 3 images of 16 planes. Its CPU kernel then takes one of two paths: a generic
# one that computes every output value on its own, or (for outputs with H + W <= 128, or
# C == 3 on one thread, as in DataLoader workers) a channels-last one that vectorises across
# planes and treats leftover planes differently in the last bit. We interpolate [3, F, H, W]
# frames at once; padding F to a multiple of 16 where the channels-last path could apply makes
# every plane take the same path, with the same arithmetic, as in the official call.
PLANE_GROUP = 16


def _bilinear(planes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[3, F, H, W] -> [3, F, *size]: bilinear, align_corners=False, no antialias."""
    count = planes.shape[1]
    padding = -count % PLANE_GROUP if (sum(size) <= 128 or count == 3) else 0
    if padding:
        planes = torch.cat([planes, planes.new_zeros(3, padding, *planes.shape[2:])], dim=1)
    resized = F.interpolate(planes, size=size, mode="bilinear", align_corners=False,
                            antialias=False)
    return resized[:, :count]


def scale_frames(frames: torch.Tensor, protocol: SamplingProtocol) -> torch.Tensor:
    """uint8 [F, H, W, 3] decoded frames -> float32 [F, 3, S, S] backbone input frames.

    Frames are scaled to [0, 1], resized (straight to S x S, or short side to S then a centre
    crop) and optionally normalised, equal to the official per-clip transform.
    """
    planes = frames.permute(3, 0, 1, 2).to(torch.float32) / 255
    size = protocol.img_size
    if protocol.resize == "direct":
        planes = _bilinear(planes, (size, size))
    else:
        height, width = planes.shape[-2:]
        scale = size / min(height, width)
        new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
        top, left = (new_h - size) // 2, (new_w - size) // 2
        planes = _bilinear(planes, (new_h, new_w))[..., top:top + size, left:left + size]
    x = planes.permute(1, 0, 2, 3)
    if protocol.normalise == "imagenet":
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        x = (x - mean) / std
    return x.contiguous()


@dataclass
class VideoSource:
    """An opened video: the decord reader and what the store records about it."""

    reader: object
    num_frames: int
    fps: float
    height: int
    width: int

    @property
    def info(self) -> dict:
        return {"num_frames": self.num_frames, "fps": self.fps,
                "duration": self.num_frames / self.fps,
                "height": self.height, "width": self.width}


def open_video(path: str | os.PathLike, num_threads: int = 1) -> VideoSource:
    """Open a video with decord; any problem becomes a VideoError with a short reason."""
    import decord

    try:
        reader = decord.VideoReader(str(path), num_threads=num_threads)
        num_frames = len(reader)
        fps = float(reader.get_avg_fps())
        height, width = reader[0].shape[:2] if num_frames else (0, 0)
    except Exception as err:  # decord raises RuntimeError or DECORDError for anything broken
        raise VideoError(f"cannot open: {_first_line(err)}") from None
    if num_frames < 1:
        raise VideoError("no frames")
    if not (np.isfinite(fps) and fps > 0):
        raise VideoError(f"invalid frame rate {fps}")
    return VideoSource(reader, num_frames, fps, int(height), int(width))


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def decode_frames(source: VideoSource, indices: np.ndarray,
                  protocol: SamplingProtocol) -> torch.Tensor:
    """Decode and scale the given native frames (sorted, distinct): float32 [len, 3, S, S]."""
    frame_bytes = source.height * source.width * 3
    per_call = max(1, MAX_DECODE_BYTES // max(frame_bytes, 1))
    scaled = []
    for begin in range(0, len(indices), per_call):
        wanted = indices[begin:begin + per_call].tolist()
        try:
            raw = source.reader.get_batch(wanted).asnumpy()
        except Exception as err:
            raise VideoError(f"cannot decode frames {wanted[0]}-{wanted[-1]}: "
                             f"{_first_line(err)}") from None
        if raw.shape[0] != len(wanted):
            raise VideoError(f"decoded {raw.shape[0]} frames, expected {len(wanted)}")
        scaled.append(scale_frames(torch.from_numpy(raw), protocol))
    return torch.cat(scaled)


def iter_chunks(video: str, path: str | os.PathLike, protocol: SamplingProtocol,
                clips_per_chunk: int, num_threads: int = 1):
    """Yield the chunks of one video in clip order (see the module docstring)."""
    source = open_video(path, num_threads)
    indices = protocol.native_indices(source.num_frames, source.fps)
    num_clips = len(indices)
    cached_ids = np.zeros(0, dtype=np.int64)  # native ids of the frames kept from last chunk
    cached = None
    for first in range(0, num_clips, clips_per_chunk):
        clip_ids = indices[first:first + clips_per_chunk]
        needed = np.unique(clip_ids)
        fresh = needed[~np.isin(needed, cached_ids)]
        parts_ids, parts = [], []
        if cached is not None:
            keep = np.isin(cached_ids, needed)
            parts_ids.append(cached_ids[keep])
            parts.append(cached[torch.from_numpy(keep)])
        if len(fresh):
            parts_ids.append(fresh)
            parts.append(decode_frames(source, fresh, protocol))
        order = np.argsort(np.concatenate(parts_ids), kind="stable")
        cached_ids = np.concatenate(parts_ids)[order]  # == needed
        cached = torch.cat(parts)[torch.from_numpy(order)]
        yield {"kind": "chunk", "video": video, "first_clip": first, "num_clips": num_clips,
               "info": source.info, "frames": cached,
               "index": torch.from_numpy(np.searchsorted(cached_ids, clip_ids))}


def gather_clips(frames: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Frames [U, 3, S, S] and index [n, T] -> clips [n, 3, T, S, S] (the backbone's layout)."""
    return frames[index].permute(0, 2, 1, 3, 4)


class ClipChunks(torch.utils.data.IterableDataset):
    """The chunks of many videos, sharded over DataLoader workers.

    ``videos`` is a list of ``(video_id, path)``; worker w of n takes items w, w+n, ... so that
    each video is decoded by exactly one worker, in clip order. ``wanted(video_id)`` is asked
    just before a video is opened (to skip videos finished or taken by another extractor
    meanwhile); a skipped video yields a ``skipped`` item.
    """

    def __init__(self, videos, protocol: SamplingProtocol, clips_per_chunk: int,
                 wanted=None, decode_threads: int = 1):
        self.videos = list(videos)
        self.protocol = protocol
        self.clips_per_chunk = clips_per_chunk
        self.wanted = wanted
        self.decode_threads = decode_threads

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        share = self.videos if worker is None else self.videos[worker.id::worker.num_workers]
        for video, path in share:
            if self.wanted is not None and not self.wanted(video):
                yield {"kind": "skipped", "video": video}
                continue
            try:
                yield from iter_chunks(video, path, self.protocol, self.clips_per_chunk,
                                       self.decode_threads)
            except VideoError as err:
                yield {"kind": "failed", "video": video, "error": f"{Path(path).name}: {err}"}


def make_loader(dataset: ClipChunks, num_workers: int, pin_memory: bool):
    """A DataLoader that decodes ahead of the backbone in ``num_workers`` processes.

    Workers start by forkserver, not fork: a fork copies whatever locks the parent's decoder
    and thread pools hold at that instant (and a CUDA context), which can hang the child.
    """
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
        multiprocessing_context="forkserver" if num_workers else None,
        prefetch_factor=4 if num_workers else None, persistent_workers=False)
