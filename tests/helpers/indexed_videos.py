"""Test videos whose frames carry their own index in the pixels, in the encodings that trip
decoders up: open GOPs, B-frames, edit lists, variable frame rate, AV1.

Frame ``i`` is eight black or white vertical stripes, bit ``b`` of ``i`` in stripe ``b``: a
pattern every lossy codec keeps at 64x48, so :func:`read_index` recovers ``i`` from any decoded
(or scaled) frame. Written with PyAV, like helpers/videos.py.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np

from helpers import REPO, TESTS_DIR
from synth.videos import encode

BITS = 8  # up to 256 frames
WIDTH, HEIGHT = 64, 48  # stripes of 8 px
# name -> (container format, codec, pixel format, options): what real datasets hold.
ENCODINGS = {
    "h264_open_gop": ("matroska", "libx264", "yuv420p",
                      {"preset": "fast", "x264-params": "open-gop=1:keyint=30:min-keyint=30:"
                       "scenecut=0:bframes=3"}),
    "h264_closed_gop": ("mp4", "libx264", "yuv420p", {"preset": "ultrafast", "g": "30"}),
    "mpeg4_bframes": ("avi", "mpeg4", "yuv420p", {"bf": "2", "g": "30", "qscale": "3"}),
    "hevc_default": ("mp4", "libx265", "yuv420p", {"x265-params": "keyint=30:log-level=none"}),
    "vp9": ("webm", "libvpx-vp9", "yuv420p", {"cpu-used": "8"}),
    "av1": ("matroska", "libsvtav1", "yuv420p", {"preset": "12", "svtav1-params": "log-level=0"}),
    "ffv1_lossless": ("matroska", "ffv1", "bgr0", {}),
}
EXTENSIONS = {"matroska": ".mkv", "avi": ".avi", "mp4": ".mp4", "webm": ".webm"}


def can_encode(encoding: str) -> bool:
    try:
        av.codec.Codec(ENCODINGS[encoding][1], "w")
        return True
    except Exception:  # this FFmpeg build lacks the encoder
        return False


def index_image(index: int) -> np.ndarray:
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    for bit in range(BITS):
        if (index >> bit) & 1:
            image[:, bit * 8:(bit + 1) * 8] = 255
    image[..., 1] //= 2  # some colour, so a channel mix-up would show
    return image


def read_index(image) -> int:
    """The index drawn into a decoded frame: uint8 [H, W, 3] or a scaled float [3, S, S]."""
    image = np.asarray(image, dtype=np.float64)
    if image.shape[0] == 3:  # scaled frame, channels first, values in [0, 1]
        image = image.transpose(1, 2, 0) * 255
    columns = image[..., 0].mean(axis=0)
    width = image.shape[1] / BITS
    return sum(1 << bit for bit in range(BITS)
               if columns[int((bit + 0.5) * width)] > 127)


def write_indexed(path, num_frames: int, encoding: str, fps=30, frame_times=None,
                  images=None) -> Path:
    """Frames 0..num_frames-1 (or the given uint8 ``images``); ``frame_times`` (seconds)
    makes a variable-frame-rate file."""
    form, codec, pix_fmt, options = ENCODINGS[encoding]
    path = Path(path)
    if codec.startswith("libvpx") and "decord" in sys.modules:
        # decord bundles its own libvpx, and once it is loaded PyAV's VP9 encoder fails to open
        # (decoding is unaffected): write the file from a fresh interpreter instead.
        return _write_elsewhere(path, num_frames, encoding, fps, frame_times, images)
    frames = np.stack([index_image(i) for i in range(num_frames)]) if images is None \
        else np.asarray(images[:num_frames])
    encode(path, frames, form, codec, pix_fmt, options, fps, frame_times)
    return path


def decode_all(path) -> np.ndarray:
    """Every frame shown, by a plain sequential PyAV decode: the truth. uint8 [F, H, W, 3]."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def write_trimmed(path, source, cut: int, fps: int = 30) -> Path:
    """``ffmpeg -ss`` + ``-c copy`` done with PyAV: ``source`` remuxed into an mp4 whose edit
    list starts at frame ``cut`` (not a keyframe); the packets before it stay in the file."""
    with av.open(str(source)) as src, av.open(str(path), "w", format="mp4") as dst:
        stream = src.streams.video[0]
        out = dst.add_stream_from_template(stream)
        shift = int(round(cut / fps / stream.time_base))
        for packet in src.demux(stream):
            if packet.dts is None:
                continue
            packet.pts -= shift
            packet.dts -= shift
            packet.stream = out
            dst.mux(packet)
    return Path(path)


def _write_elsewhere(path, num_frames, encoding, fps, frame_times, images) -> Path:
    if images is not None:
        raise NotImplementedError("images for a VP9 file once decord is loaded")
    args = json.dumps([str(path), num_frames, encoding, float(fps),
                       None if frame_times is None else list(map(float, frame_times))])
    code = (f"import json, sys; sys.path.insert(0, {str(TESTS_DIR)!r}); "
            "from helpers.indexed_videos import write_indexed; "
            "p, n, e, f, t = json.loads(sys.argv[1]); write_indexed(p, n, e, f, t)")
    subprocess.run([sys.executable, "-c", code, args], cwd=REPO, check=True,
                   capture_output=True)
    return path


def write_cut_before_keyframe(path, source, drop: int, container_format="matroska") -> Path:
    """``source`` remuxed without its first ``drop`` packets (a cut inside a GOP, no edit
    list): the frames up to the next keyframe reference frames that are gone."""
    with av.open(str(source)) as src, av.open(str(path), "w", format=container_format) as dst:
        stream = src.streams.video[0]
        out = dst.add_stream_from_template(stream)
        for number, packet in enumerate(src.demux(stream)):
            if packet.dts is None or number < drop:
                continue
            packet.stream = out
            dst.mux(packet)
    return Path(path)
