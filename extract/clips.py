"""Decode videos into backbone-ready clips (decoding.py picks the decoder), in DataLoader workers.

Each worker takes its share of the videos and yields *chunks*: a run of consecutive clips of one
video, sent as the distinct frames they use plus an index map [n, clip_len] into those frames.
The frames are scaled, float32 [U, 3, S, S] by default; with the protocol's ``resize_on
"device"`` they are the decoded uint8 [U, H, W, 3] (a quarter of the bytes at the same size),
and :func:`backbone_frames` scales them on the device. Clips overlap (stride 4 < length 16), so sending frames rather
than clips moves a quarter of the bytes, and every frame is decoded and resized exactly once:
the frames a chunk shares with the next one are carried over, not decoded again. The main
process gathers the clips (on the GPU when there is one) and batches them across videos.

A long video may be extracted in parts (store/parts.py): a part is a clip range of it, and its
chunks cover that range only. The frames before the range are decoded in order and dropped
(never seeking, as decoding.py explains), not scaled; a clip's frames, and so its features, are
the same whether it is extracted in a part or with the whole video.

A video that cannot be decoded becomes a ``failed`` item naming it; the worker goes on with
the next video.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from extract.decoding import VideoError, VideoSource, open_video
from store.protocol import IMAGENET_MEAN, IMAGENET_STD, SamplingProtocol, part_range

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv",
                    ".wmv", ".3gp", ".ts", ".ogv")


# Crash-test hook (tests/test_extract_faults.py): with LOSA_TAL_KILL_AT="decode:3" set, the
# process SIGKILLs itself the third time it passes the point named "decode" (points: decode here;
# write, commit, published and assemble in pipeline.py). Unset, a point costs one environment lookup.
KILL_AT_ENV = "LOSA_TAL_KILL_AT"
_points_passed: dict = {}


def fault_point(name: str) -> None:
    target = os.environ.get(KILL_AT_ENV)
    if not target or target.partition(":")[0] != name:
        return
    _points_passed[name] = _points_passed.get(name, 0) + 1
    if _points_passed[name] == int(target.partition(":")[2] or 1):
        os.kill(os.getpid(), signal.SIGKILL)


# Bit-exact scaling. The official script interpolates each clip as a [C=3, T=16, H, W] tensor,
# so PyTorch sees 3 images of 16 planes. Its CPU kernel then takes one of two paths: a generic
# one that computes every output value on its own, or (for outputs with H + W <= 128, or
# C == 3 on one thread, as in DataLoader workers) a channels-last one that vectorises across
# planes and treats leftover planes differently in the last bit. We interpolate [3, F, H, W]
# frames at once, taking the official call's path: for real sizes the generic one (F == 3 is
# split as 2 + 1 to stay off the channels-last path); for tiny outputs (smoke tests) the
# channels-last one, with F padded to a multiple of 16 so that no plane is a leftover. That
# padding costs up to 16 input frames of float32, so huge frames at a tiny size use a lot of
# transient memory (2.3 GB at 4000x3000); the 224 protocol never pads.
PLANE_GROUP = 16
SMALL_OUTPUT = 128  # H + W at or below which PyTorch always takes the channels-last path


def _bilinear(planes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[3, F, H, W] -> [3, F, *size]: bilinear, align_corners=False, no antialias."""
    count = planes.shape[1]
    if sum(size) > SMALL_OUTPUT:
        if count == 3:
            return torch.cat([_interpolate(planes[:, :2], size), _interpolate(planes[:, 2:], size)],
                             dim=1)
        return _interpolate(planes, size)
    padding = -count % PLANE_GROUP
    if padding:
        planes = torch.cat([planes, planes.new_zeros(3, padding, *planes.shape[2:])], dim=1)
    return _interpolate(planes, size)[:, :count]


def _interpolate(planes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(planes, size=size, mode="bilinear", align_corners=False, antialias=False)


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
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
    return x.contiguous()


def decode_frames(source: VideoSource, indices: np.ndarray,
                  protocol: SamplingProtocol) -> torch.Tensor:
    """Decode the given native frames (sorted, distinct) as they travel to the main process:
    scaled, float32 [len, 3, S, S], or with ``resize_on "device"`` uint8 [len, H, W, 3]."""
    on_device = protocol.resize_on == "device"
    frames = []
    for raw in source.read(indices):
        fault_point("decode")
        raw = torch.from_numpy(raw)
        frames.append(raw if on_device else scale_frames(raw, protocol))
    return torch.cat(frames)


def backbone_frames(frames: torch.Tensor, protocol: SamplingProtocol) -> torch.Tensor:
    """A chunk's frames, already on the device, as backbone input: float32 [U, 3, S, S]."""
    return scale_frames(frames, protocol) if protocol.resize_on == "device" else frames


def iter_chunks(video: str, path: str | os.PathLike, protocol: SamplingProtocol,
                clips_per_chunk: int, num_threads: int = 1, part=None):
    """Yield the chunks of one video in clip order (see the module docstring); with ``part``
    ``(k, parts)``, of that part's clips only."""
    source = open_video(path, num_threads, every_frame=protocol.uses_every_frame)
    try:
        yield from _chunks_of(source, video, protocol, clips_per_chunk, part)
    finally:
        source.close()


def _chunks_of(source: VideoSource, video: str, protocol: SamplingProtocol, clips_per_chunk: int,
               part=None):
    """Each chunk says which clips it holds (``first_clip``, ``index``), of which clip range
    (``clips``: the part's, or the whole video's) and which ``part`` (None: the whole video)."""
    indices = protocol.native_indices(source.num_frames, source.fps, source.frame_times)
    num_clips = len(indices)
    start, stop = (0, num_clips) if part is None else part_range(*part, num_clips)
    common = {"kind": "chunk", "video": video, "part": part, "clips": (start, stop),
              "num_clips": num_clips, "info": source.info}
    # The first chunk carries the whole video's feature times (the worker knows the frames'
    # own times); a part of no clips (a video of fewer clips than parts) is one empty chunk.
    times = protocol.feature_times(source.num_frames, source.fps, source.frame_times)
    if start == stop:
        yield {**common, "first_clip": start, "times": times, "frames": torch.zeros(0),
               "index": torch.zeros((0, protocol.clip_len), dtype=torch.int64)}
        return
    cached_ids = np.zeros(0, dtype=np.int64)  # native ids of the frames kept from last chunk
    cached = None
    for first in range(start, stop, clips_per_chunk):
        clip_ids = indices[first:min(first + clips_per_chunk, stop)]
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
        yield {**common, "first_clip": first, "times": times if first == start else None,
               "frames": cached, "index": torch.from_numpy(np.searchsorted(cached_ids, clip_ids))}


def gather_clips(frames: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Frames [U, 3, S, S] and index [n, T] -> clips [n, 3, T, S, S] (the backbone's layout)."""
    return frames[index].permute(0, 2, 1, 3, 4)


class ClipChunks(torch.utils.data.IterableDataset):
    """The chunks of many videos, decoded in DataLoader workers.

    ``videos`` yields ``(video_id, path)`` or ``(video_id, path, part)`` (``(k, parts)``: that
    part's clips only): a list is split between the workers (worker w of n
    takes items w, w+n, ...); any other iterable (a queue that the main process fills with
    claimed videos) is read as it is, by whichever worker is free. Either way each video is
    decoded by exactly one worker, in clip order. A video that cannot be decoded yields one
    ``failed`` item, possibly after some of its chunks. A ``None`` from the iterable (nothing to
    do yet) is passed on as an ``idle`` item, so the main process hears that a worker waits.
    """

    def __init__(self, videos, protocol: SamplingProtocol, clips_per_chunk: int,
                 decode_threads: int = 1):
        self.videos = videos
        self.protocol = protocol
        self.clips_per_chunk = clips_per_chunk
        self.decode_threads = decode_threads

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        videos = self.videos
        if isinstance(videos, (list, tuple)) and worker is not None:
            videos = videos[worker.id::worker.num_workers]
        for entry in videos:
            if entry is None:
                yield {"kind": "idle"}
                continue
            video, path, *part = entry
            part = part[0] if part else None
            try:
                yield from iter_chunks(video, path, self.protocol, self.clips_per_chunk,
                                       self.decode_threads, part)
            except VideoError as err:
                yield {"kind": "failed", "video": video, "part": part,
                       "error": f"{Path(path).name}: {err}"}


PREFETCH_CHUNKS = 4  # chunks each worker decodes ahead (they wait in shared memory)


def make_loader(dataset: ClipChunks, num_workers: int, pin_memory: bool):
    """A DataLoader that decodes ahead of the backbone in ``num_workers`` processes.

    Workers start by spawn: not fork, because a fork copies whatever locks the parent's decoder
    and thread pools hold at that instant (and a CUDA context), which can hang the child; not
    forkserver, because its workers are children of the fork server, so nothing notices when the
    main process dies, and a killed extraction would leave its workers (and the fork server they
    keep alive) running. They die with the main process however it dies (extract/workers.py).
    """
    from extract.workers import SpawnContext

    return torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
        multiprocessing_context=SpawnContext() if num_workers else None,
        prefetch_factor=PREFETCH_CHUNKS if num_workers else None, persistent_workers=False)
