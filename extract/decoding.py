"""Open a video and read its frames exactly: the frames shown, in presentation order.

Two decoders, chosen per video (the store records which one and its version):

- **decord** (the official VideoMAEv2 extraction's decoder) reads a video when the protocol
  uses every frame (the native rate, as the official protocol), decord opens it, counts exactly
  the frames the container shows, and those frames are evenly spaced. That is nearly every
  dataset file, and there it is bit-exact and fast.
- **PyAV** (FFmpeg's libavcodec, with dav1d for AV1) reads the rest. Every video when the
  protocol skips frames (``--fps``, ``--frame-interval``): PyAV converts only the frames used
  to RGB, where decord converts every frame it decodes (its own ``skip_frames`` lands on wrong
  frames in open-GOP streams, as its seeks do); on 8-bit video both give the same RGB, bit for
  bit. And whatever the protocol: codecs decord's bundled
  FFmpeg lacks (AV1), frame sizes decord fails to copy, files whose edit list hides frames
  (``ffmpeg -ss ... -c copy``, a cut on a non-keyframe: decord counts every packet and returns
  hidden frames), files cut before their first keyframe (frames listed that no decoder can
  produce: decord counts them and repeats the last frame; their count is found by decoding
  once more), and variable frame rate (the feature times then come from the frames' own
  timestamps).

Either decoder is read front to back and never seeks: decord 0.6 looks keyframes up in decode
order but frames in display order, so a seek across a keyframe of an open-GOP stream (MPEG-4
Part 2 with B-frames, x265's default, open-GOP H.264) lands on another frame. Frames are
decoded in order and the wanted ones kept; going backwards (only odd protocols need it) reopens
the file. The container's packet list (a demux pass without decoding) gives the frames shown
and their timestamps before decoding starts; a decode that delivers fewer is an error.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import numpy as np

from store.protocol import frame_times_duration

# Raw decoded frames held at once per worker; bounds memory on 4K or 8K videos.
MAX_DECODE_BYTES = 128 * 2**20
# Timestamps further than this fraction of a frame from an even spacing make a video
# variable-frame-rate (containers round timestamps: mkv to 1 ms, a third of a 30 fps frame).
VARIABLE_RATE_TOLERANCE = 0.25


class VideoError(Exception):
    """A video that cannot be decoded (corrupt, truncated, empty, not a video)."""


@dataclass
class StreamProbe:
    """What the container says about the first video stream: its packets (and, for a file cut
    before its first keyframe, the frames that actually decode)."""

    codec: str
    container: str
    width: int
    height: int
    average_fps: float | None  # the container's average rate (what decord reports)
    frame_times: np.ndarray  # seconds from the first frame shown, float64 [frames shown]
    hidden: int  # packets the container marks discarded (edit lists)
    undecodable: int = 0  # frames listed but never decoded (a cut before the first keyframe)

    @property
    def num_frames(self) -> int:
        return len(self.frame_times)

    @property
    def variable_rate(self) -> bool:
        times = self.frame_times
        if len(times) < 3:
            return False
        step = times[-1] / (len(times) - 1)
        even = np.arange(len(times)) * step
        return bool(np.abs(times - even).max() > VARIABLE_RATE_TOLERANCE * step)

    @property
    def measured_fps(self) -> float | None:
        """Frames per second from the timestamps: frames shown / duration."""
        duration = frame_times_duration(self.frame_times, None)
        return self.num_frames / duration if duration else None


def probe(path) -> StreamProbe:
    """Demux the first video stream with PyAV, decoding only where a cut before the first
    keyframe makes the packet count wrong; problems become VideoError."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError("cannot open: no video stream")
            stream = container.streams.video[0]
            ticks, hidden, starts_on_key = [], 0, None
            for packet in container.demux(stream):
                if packet.size == 0:  # the demuxer's end-of-stream marker
                    continue
                if starts_on_key is None:
                    starts_on_key = packet.is_keyframe
                if packet.is_discard:
                    hidden += 1
                    continue
                ticks.append(packet.pts if packet.pts is not None else packet.dts)
            undecodable = 0
            if ticks and not starts_on_key:
                # Cut before its first keyframe: the frames that reference what was cut away
                # never come out of the decoder. Only a decode tells how many: count them.
                container.seek(0)
                shown = [frame.pts for frame in container.decode(stream)]
                undecodable, ticks = len(ticks) - len(shown), shown
            codec = stream.codec_context.codec.canonical_name  # "av1", not the decoder's name
            width, height = stream.codec_context.width, stream.codec_context.height
            rate = stream.average_rate
            time_base = stream.time_base
            container_name = container.format.name.split(",")[0]  # "mov,mp4,m4a,..." -> "mov"
    except VideoError:
        raise
    except Exception as err:  # PyAV raises av.FFmpegError subclasses, OSError, ValueError...
        raise VideoError(f"cannot open: {first_line(err)}") from None
    if not ticks:
        raise VideoError("cannot open: no frames")
    average_fps = float(rate) if rate else None
    if None in ticks or time_base is None:  # no timestamps at all (raw streams): evenly spaced
        step = 1 / average_fps if average_fps else 0.0
        times = np.arange(len(ticks), dtype=np.float64) * step
    else:
        ordered = np.sort(np.asarray(ticks, dtype=np.int64))
        times = (ordered - ordered[0]).astype(np.float64) * float(time_base)
    return StreamProbe(codec, container_name, int(width), int(height), average_fps, times,
                       hidden, undecodable)


def stated_duration(path) -> float | None:
    """The duration a video's container states, in seconds, read from its header only (no demux
    pass): an estimate for planning which videos go where. None when it states none or the file
    does not open; decoding reports such a file."""
    import av

    try:
        with av.open(str(path)) as container:
            if container.duration:
                return container.duration / av.time_base
            stream = container.streams.video[0] if container.streams.video else None
            if stream is not None and stream.duration and stream.time_base:
                return float(stream.duration * stream.time_base)
    except Exception:  # PyAV raises av.FFmpegError subclasses, OSError, ValueError...
        return None
    return None


@dataclass
class VideoSource:
    """An opened video: its frames, read front to back, and what the store records about it.

    ``frame_times`` is set only for a variable frame rate (evenly spaced frames keep the
    official ``index / fps`` times); it holds each frame's time from the first, in seconds.
    """

    path: str
    decoder: str  # "decord" or "pyav"
    num_frames: int
    fps: float
    height: int
    width: int
    codec: str = ""
    container: str = ""
    frame_times: np.ndarray | None = None
    num_threads: int = 1
    _reader: object = field(default=None, repr=False)
    _position: int = 0  # index of the next frame the reader delivers

    @property
    def info(self) -> dict:
        duration = self.num_frames / self.fps if self.frame_times is None else \
            frame_times_duration(self.frame_times, self.fps)
        return {"num_frames": self.num_frames, "fps": self.fps, "duration": duration,
                "height": self.height, "width": self.width,
                "frame_rate": "constant" if self.frame_times is None else "variable",
                "decoder": decoder_record(self.decoder)}

    def read(self, indices: np.ndarray):
        """Yield uint8 [k, H, W, 3] batches of the given frames (sorted, distinct), in order."""
        wanted = [int(i) for i in indices]
        if not wanted:
            return
        if wanted[0] < self._position:
            self._rewind()
        per_call = max(1, MAX_DECODE_BYTES // max(self.height * self.width * 3, 1))
        reader = self._read_decord if self.decoder == "decord" else self._read_pyav
        yield from reader(wanted, per_call)

    def _rewind(self):
        if self.decoder == "decord":
            self._reader.seek(0)  # frame 0 starts the stream: the one safe seek
        else:
            self._close_pyav()
        self._position = 0

    # -- decord: consecutive get_batch calls, so it never seeks ------------------------------
    def _read_decord(self, wanted, per_call):
        stop, kept = wanted[-1] + 1, np.asarray(wanted)
        for begin in range(self._position, stop, per_call):
            span = list(range(begin, min(begin + per_call, stop)))
            try:
                raw = self._reader.get_batch(span).asnumpy()
            except Exception as err:
                raise VideoError(f"cannot decode frames {span[0]}-{span[-1]}: "
                                 f"{first_line(err)}") from None
            if raw.shape[0] != len(span):
                raise VideoError(f"decoded {raw.shape[0]} frames, expected {len(span)}")
            self._position = span[-1] + 1
            keep = kept[(kept >= begin) & (kept < self._position)] - begin
            if len(keep) == len(span):  # every frame wanted (the native rate): no copy
                yield raw
            elif len(keep):  # frames between wanted ones are decoded all the same, in order
                yield raw[keep]

    # -- PyAV: one sequential decode ---------------------------------------------------------
    def _frames_pyav(self):
        import av

        if self._reader is None:
            container = av.open(self.path)
            stream = container.streams.video[0]
            stream.codec_context.thread_count = self.num_threads
            self._reader = (container, container.decode(stream))
            self._position = 0
        return self._reader[1]

    def _close_pyav(self):
        if self._reader is not None:
            self._reader[0].close()
            self._reader = None

    def _read_pyav(self, wanted, per_call):
        frames = self._frames_pyav()
        batch, pending = [], iter(wanted)
        target = next(pending)
        try:
            while target is not None:
                frame = next(frames, None)
                if frame is None:
                    raise VideoError(f"decoded {self._position} frames, the container lists "
                                     f"{self.num_frames}")
                index, self._position = self._position, self._position + 1
                if index < target:
                    continue
                batch.append(frame.to_ndarray(format="rgb24"))
                target = next(pending, None)
                if len(batch) == per_call or target is None:
                    yield np.stack(batch)
                    batch = []
        except VideoError:
            raise
        except Exception as err:
            raise VideoError(f"cannot decode frame {self._position}: {first_line(err)}") \
                from None

    def close(self):
        if self.decoder == "pyav":
            self._close_pyav()


def decoder_record(name: str) -> dict:
    """``{"name", "version"}`` of a decoder (PyAV's with the libavcodec it wraps)."""
    if name == "decord":
        import decord

        return {"name": "decord", "version": decord.__version__}
    import av

    codec = ".".join(map(str, av.library_versions["libavcodec"]))
    return {"name": "pyav", "version": f"{av.__version__} (libavcodec {codec})"}


def open_video(path: str | os.PathLike, num_threads: int = 1,
               every_frame: bool = True) -> VideoSource:
    """Probe a video and open it with the decoder that reads it exactly (module docstring);
    ``every_frame``: whether the protocol uses every frame (else PyAV reads it)."""
    try:
        if os.path.getsize(path) == 0:
            raise VideoError("empty file")
    except OSError as err:
        raise VideoError(f"cannot read: {err.strerror}") from None
    found = probe(path)
    common = dict(path=str(path), codec=found.codec, container=found.container,
                  num_threads=num_threads)
    if every_frame and found.hidden == found.undecodable == 0 and not found.variable_rate:
        reader = open_decord(path, num_threads)
        fps = float(reader.get_avg_fps()) if reader is not None else 0.0
        if reader is not None and len(reader) == found.num_frames and np.isfinite(fps) \
                and fps > 0:
            first = _first_frame(reader)
            if first is not None:
                height, width = first.shape[:2]
                return VideoSource(decoder="decord", num_frames=len(reader), fps=fps,
                                   height=int(height), width=int(width), _reader=reader,
                                   **common)
    variable = found.variable_rate
    fps = found.measured_fps if variable else (found.average_fps or found.measured_fps)
    if not (fps and np.isfinite(fps) and fps > 0):
        raise VideoError(f"invalid frame rate {fps}")
    return VideoSource(decoder="pyav", num_frames=found.num_frames, fps=float(fps),
                       height=found.height, width=found.width,
                       frame_times=found.frame_times if variable else None, **common)


def _first_frame(reader):
    """Frame 0 through ``get_batch``, the call extraction uses; None where decord fails on it
    (decord 0.6 cannot copy frames of some widths, 16, 24, 48 or 72 px among them)."""
    try:
        return reader.get_batch([0]).asnumpy()[0]
    except Exception:
        return None


def open_decord(path, num_threads: int = 1):
    """A decord reader, or None when decord cannot open the file (e.g. AV1)."""
    import decord

    # FFmpeg's own log lines (``moov atom not found``...) would interleave with the progress
    # bar; a video decord cannot read goes to PyAV, which says why if it cannot either.
    decord.logging.set_level(decord.logging.QUIET)
    try:
        reader = decord.VideoReader(str(path), num_threads=num_threads)
        return reader if len(reader) else None
    except Exception:  # decord raises RuntimeError or DECORDError for anything it cannot read
        return None


# decord's C++ messages start "[10:31:29] /src/video/video_reader.cc:151: Check failed: ..."
_DECORD_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (?:Check failed: .*?ERROR )?")


def first_line(err: Exception) -> str:
    """The gist of a decoder exception: its first line, without decord's source location (or,
    from PyAV, FFmpeg's message without the errno and file name)."""
    if getattr(err, "strerror", None):
        return str(err.strerror)[:200]
    text = str(err).strip().splitlines()
    line = _DECORD_PREFIX.sub("", text[0]) if text else ""
    return line[:200] or type(err).__name__
