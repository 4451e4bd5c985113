"""The sampling protocol: which native frames make each clip, how they are scaled, and when each
feature step happens. Every store records it (``meta["protocol"]``, see store/meta.py), and the
times a store holds follow its arithmetic, so it lives beside the store; extraction (extract/)
and ``store import`` (store/transfer.py) both lay clips out with it.

The defaults reproduce the official VideoMAEv2 TAL extraction (``extract_tad_feature.py`` in
OpenGVLab/VideoMAEv2): 16 consecutive native frames, a clip starting every 4 frames
(``range(0, num_frames - 15, 4)``, so clips that would run past the last frame are dropped),
frames scaled to [0, 1] and resized straight to 224x224 (bilinear, ``align_corners=False``, no
antialiasing, no crop) and no mean/std. Where the official script would crash (a video shorter
than one clip) we emit one clip padded by repeating the last frame.

Two timelines exist: the *native* one (the decoded frames) and the *sampling* one (native, or
resampled to ``fps``). Clips are laid out on the sampling timeline; :meth:`native_indices` maps
them back to decoded frames. The time of feature step ``t`` is the clip centre,
``(first_t + clip_len * frame_interval / 2) / fps`` seconds (ActionFormer's convention).

A variable-frame-rate video passes its frames' own times (``frame_times``, seconds from the
first frame): resampled frame ``k`` is then the frame on screen at ``k / fps`` by those times,
and at the native rate a feature's time is the time of its clip-centre frame. Evenly spaced
frames pass none and keep the official ``index / fps`` arithmetic.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from losa_tal import InputError, check_values

RESIZE_MODES = ("direct", "short_side_crop")
NORMALISATIONS = ("none", "imagenet")
TAIL_POLICIES = ("drop", "pad")
# Where frames are resized: in the decoding workers by the official CPU transform (they send
# float32 frames at img_size), or on the extraction device (they send uint8 frames at native
# size; on a GPU the resize differs from the CPU one in the last bits, docs/extraction.md).
RESIZE_PLACES = ("worker", "device")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Recorded so that a reader of the store knows how feature times were derived.
TIME_CONVENTION = "clip_centre: (first_frame + clip_len * frame_interval / 2) / fps"
# How frames are found (extract/decoding.py); recorded so that stores made by the older
# index-seeking reader (wrong frames on open-GOP streams when resampling) are told apart.
DECODING_POLICY = ("sequential: frames decoded in presentation order, never seeking; frames "
                   "hidden by an edit list are not counted; variable frame rate: frames and "
                   "times by the frames' own timestamps")


@dataclasses.dataclass(frozen=True)
class SamplingProtocol:
    """The complete recipe from decoded frames to backbone input, recorded in every store.

    clip_len: frames per clip (the backbone's ``all_frames``).
    clip_stride: frames between the first frames of consecutive clips (sampling timeline).
    frame_interval: step between the frames inside one clip (1 = consecutive).
    fps: ``None`` keeps the native frame rate; a number resamples the timeline to that rate.
    img_size: side of the square backbone input.
    resize: ``"direct"`` (straight to img_size x img_size, the official protocol) or
        ``"short_side_crop"`` (short side to img_size, then a centre crop).
    normalise: ``"none"`` (official: values in [0, 1]) or ``"imagenet"`` mean/std.
    tail: ``"drop"`` clips that would run past the last frame (official), or ``"pad"`` one
        more clip so the end of the video is covered, repeating the last frame.
    resize_on: ``"worker"`` (official CPU transform in the decoding workers) or ``"device"``
        (workers send native-size uint8 frames; scaling and resize run on the device).
    """

    clip_len: int = 16
    clip_stride: int = 4
    frame_interval: int = 1
    fps: float | None = None
    img_size: int = 224
    resize: str = "direct"
    normalise: str = "none"
    tail: str = "drop"
    resize_on: str = "worker"

    def __post_init__(self):  # constructed directly too (tests, the demo, store import)
        self.check()

    def check(self):
        """ConfigError naming the field, for a value the arithmetic below cannot use (types
        too: the protocol is also built directly, not only by the config loader)."""
        fps = self.fps
        check_values([
            *((name, _is_count(getattr(self, name)), "a positive integer", getattr(self, name))
              for name in ("clip_len", "clip_stride", "frame_interval", "img_size")),
            ("fps", fps is None or (isinstance(fps, (int, float)) and math.isfinite(fps)
                                    and fps > 0), "a positive number or null", fps),
            *((name, getattr(self, name) in allowed, f"one of {', '.join(allowed)}",
               getattr(self, name))
              for name, allowed in (("resize", RESIZE_MODES), ("normalise", NORMALISATIONS),
                                    ("tail", TAIL_POLICIES), ("resize_on", RESIZE_PLACES))),
        ])

    # -- record -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        record = dataclasses.asdict(self)
        if self.resize_on == RESIZE_PLACES[0]:  # recorded only when not the default, so that
            del record["resize_on"]  # stores written before the field existed stay appendable
        return {**record, "time_convention": TIME_CONVENTION, "decoding": DECODING_POLICY}

    @classmethod
    def from_dict(cls, record: dict) -> "SamplingProtocol":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(record) - fields - {"time_convention", "decoding"}
        if unknown:
            raise InputError(f"protocol: unknown keys {sorted(unknown)}")
        if record.get("time_convention", TIME_CONVENTION) != TIME_CONVENTION:
            raise InputError(f"protocol: unsupported time convention {record['time_convention']!r}")
        if record.get("decoding", DECODING_POLICY) != DECODING_POLICY:
            raise InputError(f"protocol: unsupported decoding policy {record['decoding']!r}")
        return cls(**{k: v for k, v in record.items() if k in fields})

    # -- the sampling timeline --------------------------------------------------------------
    @property
    def span(self) -> int:
        """Sampling-timeline frames covered by one clip, first to last inclusive."""
        return (self.clip_len - 1) * self.frame_interval + 1

    @property
    def uses_every_frame(self) -> bool:
        """Do the clips, together, use every native frame up to the last one they use?"""
        return self.fps is None and self.frame_interval == 1 and self.clip_stride <= self.clip_len

    def sampling_fps(self, native_fps: float) -> float:
        return float(self.fps) if self.fps is not None else float(native_fps)

    def num_sampled_frames(self, num_frames: int, native_fps: float, frame_times=None) -> int:
        """Frames on the sampling timeline: those whose instant k / fps falls inside the video."""
        if self.fps is None:
            return num_frames
        if not num_frames:
            return 0
        if frame_times is None:
            scaled = num_frames * self.fps / native_fps
        else:
            scaled = frame_times_duration(frame_times, native_fps) * self.fps
        # ceil with a tolerance, so 30 -> 15 fps of 31 frames gives 16 (k = 0..15), not 17.
        return max(1, math.ceil(scaled - 1e-9))

    def clip_starts(self, num_sampled: int) -> np.ndarray:
        """First sampling-timeline frame of each clip; at least one clip for any non-empty video."""
        if num_sampled <= 0:
            return np.zeros(0, dtype=np.int64)
        room = num_sampled - self.span  # how far the first frame may move with a full clip
        if room < 0:
            count = 1  # shorter than one clip: one clip, padded
        elif self.tail == "drop":
            count = room // self.clip_stride + 1
        else:
            count = -(-room // self.clip_stride) + 1  # ceil: the last clip reaches the end
        return np.arange(count, dtype=np.int64) * self.clip_stride

    def native_indices(self, num_frames: int, native_fps: float, frame_times=None) -> np.ndarray:
        """Native frame index of every clip frame, int64 [num_clips, clip_len].

        Frames past the end (padding) repeat the last frame.
        """
        num_sampled = self.num_sampled_frames(num_frames, native_fps, frame_times)
        starts = self.clip_starts(num_sampled)
        offsets = np.arange(self.clip_len, dtype=np.int64) * self.frame_interval
        sampled = np.minimum(starts[:, None] + offsets[None, :], num_sampled - 1)
        if self.fps is not None and frame_times is None:
            # Resampled frame k shows the native frame on screen at instant k / fps.
            ratio = native_fps / self.fps
            sampled = np.floor(sampled * ratio + 1e-6).astype(np.int64)
        elif self.fps is not None:  # the same, by the frames' own times
            on_screen = np.searchsorted(frame_times, sampled / self.fps + 1e-6, side="right")
            sampled = np.maximum(on_screen - 1, 0).astype(np.int64)
        return np.minimum(sampled, num_frames - 1)

    def feature_times(self, num_frames: int, native_fps: float, frame_times=None) -> np.ndarray:
        """Clip-centre time in seconds of every feature step, float64 [num_clips]."""
        starts = self.clip_starts(self.num_sampled_frames(num_frames, native_fps, frame_times))
        centre = starts.astype(np.float64) + self.clip_len * self.frame_interval / 2
        if self.fps is not None or frame_times is None:
            return centre / self.sampling_fps(native_fps)
        return time_at(frame_times, centre, native_fps)

    def num_clips(self, num_frames: int, native_fps: float, frame_times=None) -> int:
        return len(self.clip_starts(self.num_sampled_frames(num_frames, native_fps,
                                                            frame_times)))


def time_at(frame_times: np.ndarray, position: np.ndarray, fps: float) -> np.ndarray:
    """The time of (fractional) native frame ``position``: between frames linearly, past the
    last frame (padded clips) at the mean frame duration."""
    last = len(frame_times) - 1
    step = frame_times[-1] / last if last else 1 / fps
    inside = np.interp(position, np.arange(last + 1), frame_times)
    return np.where(position > last, frame_times[-1] + (position - last) * step, inside)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def frame_times_duration(frame_times: np.ndarray, fps: float | None) -> float | None:
    """How long a video whose frames show at ``frame_times`` lasts: its last frame shows for
    the mean frame duration (1 / fps for a single frame)."""
    count = len(frame_times)
    if count > 1:
        return float(frame_times[-1] * count / (count - 1))
    return 1 / fps if count and fps else None


def part_range(part: int, parts: int, num_clips: int) -> tuple[int, int]:
    """Clips ``[first, stop)`` of part ``part`` of ``parts`` of a video of ``num_clips`` clips
    (a part is empty when the video has fewer clips than parts). Clip layout, so it lives here,
    where decoding workers find it without importing the store (store/parts.py: the parts)."""
    if not 0 <= part < parts:
        raise ValueError(f"part {part} is not one of {parts} parts")
    return part * num_clips // parts, (part + 1) * num_clips // parts
