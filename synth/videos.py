"""Videos of known frames, written with PyAV: the test videos, and those the benchmarks and the
GPU check decode.

``.mkv`` files are lossless (FFV1, RGB), so a test can compare decoded frames with the frames
written, bit for bit; ``.mp4`` (H.264) and ``.avi`` (MPEG-4) are lossy, like real datasets.
"""
from __future__ import annotations

import contextlib
import fractions
import os
from pathlib import Path

import av
import numpy as np

CODECS = {  # extension -> (codec, pixel format, codec options)
    ".mkv": ("ffv1", "bgr0", {}),
    ".mp4": ("libx264", "yuv420p", {"preset": "ultrafast"}),
    ".avi": ("mpeg4", "yuv420p", {}),
}


def frame_image(index: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """A reproducible uint8 RGB texture, different for every (seed, index)."""
    rng = np.random.default_rng([seed, index])
    coarse = rng.integers(0, 256, size=(height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
    # Blocks of 4x4 pixels survive lossy codecs; random blocks make every frame distinct.
    return np.ascontiguousarray(coarse.repeat(4, 0).repeat(4, 1)[:height, :width])


def write_video(path, num_frames: int, height: int = 48, width: int = 64, fps=30,
                seed: int = 0, frame_times=None, codec_ext: str | None = None) -> np.ndarray:
    """Write ``num_frames`` frames; returns them as uint8 [F, H, W, 3].

    ``fps`` may be a Fraction (30000/1001). ``frame_times`` (seconds, increasing) makes a
    variable-frame-rate file. ``codec_ext`` picks the codec by another extension than the
    file's own (a wrong-extension file).
    """
    path = Path(path)
    codec, pix_fmt, options = CODECS[codec_ext or path.suffix]
    frames = np.stack([frame_image(i, height, width, seed) for i in range(num_frames)]) \
        if num_frames else np.zeros((0, height, width, 3), np.uint8)
    container_format = {".mkv": "matroska", ".mp4": "mp4", ".avi": "avi"}[codec_ext or path.suffix]
    encode(path, frames, container_format, codec, pix_fmt, options, fps, frame_times)
    return frames


def encode(path, frames: np.ndarray, container_format: str, codec: str, pix_fmt: str,
           options: dict, fps=30, frame_times=None) -> None:
    """Encode uint8 RGB frames [F, H, W, 3] into ``path``; ``frame_times`` (seconds) as in
    :func:`write_video`."""
    rate = fractions.Fraction(fps).limit_denominator(1001)
    with scheduling_kept(), av.open(str(path), "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        stream.options = dict(options)
        if frame_times is not None:
            stream.codec_context.time_base = fractions.Fraction(1, 1000)
        container.start_encoding()  # writes the header even when there are no frames
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if frame_times is not None:
                frame.pts = int(round(frame_times[i] * 1000))
                frame.time_base = fractions.Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


@contextlib.contextmanager
def scheduling_kept():
    """Give the calling thread back the scheduling it had. SVT-AV1's encoder, run as root, puts
    it under SCHED_FIFO at priority 99, and every process started from it afterwards inherits
    that: a child that then spins inside a library keeps its real-time parent off the CPU (two
    such children starved their commands on a 2-core machine)."""
    if not hasattr(os, "sched_getscheduler"):  # not Linux
        yield
        return
    policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
    try:
        yield
    finally:
        if (os.sched_getscheduler(0), os.sched_getparam(0)) != (policy, param):
            os.sched_setscheduler(0, policy, param)
