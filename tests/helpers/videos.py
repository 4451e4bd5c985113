"""Write real test videos: known frames (synth/videos.py), odd timings and broken files."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from synth.videos import write_video


def write_random_bytes(path, size: int = 4096, seed: int = 0) -> None:
    Path(path).write_bytes(np.random.default_rng(seed).bytes(size))


def write_truncated(path, source, keep: float = 0.5) -> None:
    """A copy of ``source`` cut after the given fraction of its bytes (an aborted download)."""
    data = Path(source).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])


def write_empty(path) -> None:
    Path(path).write_bytes(b"")


def video_folder(folder, specs: dict) -> dict:
    """Write ``{name: num_frames}`` videos into ``folder``; returns ``{video_id: frames}``."""
    os.makedirs(folder, exist_ok=True)
    written = {}
    for seed, (name, num_frames) in enumerate(sorted(specs.items())):
        written[Path(name).stem] = write_video(Path(folder) / name, num_frames, seed=seed)
    return written
