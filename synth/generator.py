"""The synthetic untrimmed-video benchmark: plan, render and encode small videos with known actions.

Every actor is the same thing, a red-orange ball that rests on a ring around the frame centre, so
no single frame tells the classes apart; what the ball *does* decides the label:

- ``orbit_cw`` / ``orbit_ccw``: circles the frame centre clockwise or counter-clockwise on screen
  (direction: only the order of the frames inside a clip tells them apart);
- ``bounce_slow`` / ``bounce_fast``: runs to the opposite side of the ring and back, about one or
  three half-trips a second (speed: the same positions, visited at a different rate);
- ``dash`` / ``dash_after_signal``: one quick run across (a third of a second to a second); it is a
  ``dash_after_signal`` when the frame border flashed white during the ``SIGNAL_WINDOW_S`` seconds
  before it started (long context: the clips of the dash itself look the same);
- with ``SynthConfig.context`` (the global-context family, ``CONTEXT_CLASSES``): ``shake_blue`` /
  ``shake_green``, the first ball shaking in place for two to four seconds (one of its motions,
  as orbits, bounces and dashes are), labelled by the colour of a
  square that lights up once in a corner of the video, near its start or its end, and never within
  ``CONTEXT_GAP_S`` seconds of it (beyond the head's receptive field where shakes are detected;
  tests/test_synth.py checks it). The shakes of one video all take its one colour: what the video
  is about, not what the shake looks like, decides the label.

Each motion crosses the frame within about a second, so averaged over a clip the ball is a blur
spread over the frame; only features that keep *where* the ball is *when* inside a clip (the
pooled spatio-temporal tokens of intermediate layers) see the direction or the rhythm directly.

Unannotated distractors look like actors: balls that rest or drift slowly along the ring, border
flashes that no dash follows, and the rests before and after every action (an action's boundaries
are where the motion starts and stops, not where the ball appears). The background is a grey
texture seen through a slowly drifting camera, with a slow illumination change and pixel noise.

Actions are planned in frames, so each annotation covers exactly the frames in which the motion
happens. A second actor that only dashes or idles sometimes shares the frame, so actions overlap;
chained motions of one ball touch. Everything is drawn from ``numpy.random.default_rng([seed,
index])`` (the global-context family's cue from its own ``[seed, index, 1]``; without the family
the videos are exactly those of version 1) and encoded with single-threaded x264, so a seed gives
the same bytes on every run.
"""
from __future__ import annotations

import colorsys
import json
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from losa_tal import open_output, write_output
from synth.config import SynthConfig

CLASSES = ("orbit_cw", "orbit_ccw", "bounce_slow", "bounce_fast", "dash", "dash_after_signal")
CONTEXT_CLASSES = ("shake_blue", "shake_green")  # decided by a cue elsewhere in the video
VERSION = "losa-tal synth 3"   # 2: the global-context family (SynthConfig.context); 3: longer shakes
# What the first actor does, and how often; a second actor only dashes. With the global-context
# family the first actor also shakes: a second ball shaking beside it would share the frame
# with every other action, and the toy backbone's pooled features mix two balls' motions.
LEAD_MOTIONS = {"orbit": 0.4, "bounce": 0.4, "dash": 0.2}
LEAD_MOTIONS_CONTEXT = {"orbit": 0.25, "bounce": 0.25, "dash": 0.1, "shake": 0.4}
SIGNAL_WINDOW_S = 8.0          # a flash this many seconds before a dash makes it signalled
SIGNAL_ON_S = 0.5              # how long the border stays white
CONTEXT_GAP_S = 15.0           # no cue within this many seconds of a shake, either side
CUE_ON_S = 1.0                 # how long the corner square stays lit
CUE_EDGE_S = 5.0               # the cue starts this close to the start or the end of the video
CUE_COLOURS = {"shake_blue": (0.15, 0.35, 0.95), "shake_green": (0.15, 0.85, 0.25)}
CAMERA_DRIFT = 0.06           # camera drift amplitude, as a fraction of the frame side
BALL_HUE = 0.0                 # every ball is red-orange (hue jitters a little)
ANNOTATION_FILE = "annotations.json"
VIDEO_DIR = "videos"

# Durations (seconds, sampled log-uniformly) of each motion: from well under a second to tens.
DURATION_RANGE_S = {"orbit": (1.0, 16.0), "bounce": (1.0, 12.0), "dash": (0.3, 0.9),
                    "shake": (2.0, 4.0),
                    "drift": (1.5, 6.0), "rest": (1.0, 5.0)}


@dataclass
class Segment:
    """One stretch of one actor's life, in frames ``[start, stop)``.

    ``motion`` is one of orbit/bounce/dash/shake/drift/rest/signal/cue; ``params`` the motion's
    own numbers.
    ``origin`` is where the ball is when the segment starts, in the frame pixels of frame
    ``appeared`` (when the ball came into view); camera drift since then moves it on screen.
    """

    motion: str
    start: int
    stop: int
    origin: tuple[float, float]
    label: str | None = None
    hue: float = 0.0
    radius: float = 0.0
    params: dict = field(default_factory=dict)
    appeared: int = 0


@dataclass
class VideoPlan:
    """Everything needed to render one video and write its annotations."""

    video_id: str
    subset: str
    num_frames: int
    fps: int
    size: int
    segments: list[Segment]
    camera: dict          # drift and illumination parameters

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps

    def annotations(self, classes=CLASSES) -> list[dict]:
        actions = sorted((s for s in self.segments if s.label), key=lambda s: (s.start, s.stop))
        return [{"segment": [round(s.start / self.fps, 4), round(s.stop / self.fps, 4)],
                 "label": s.label, "label_id": classes.index(s.label)} for s in actions]


def benchmark_classes(config: SynthConfig) -> tuple:
    """The classes a benchmark with this config holds, in label-id order."""
    return CLASSES + CONTEXT_CLASSES if config.context else CLASSES


# ----------------------------------------------------------------------------------- planning


def plan_video(config: SynthConfig, index: int) -> VideoPlan:
    """Decide, for video ``index``, every actor, motion and border flash, in frames."""
    rng = np.random.default_rng([config.seed, index])
    seconds = rng.uniform(config.min_seconds, config.max_seconds)
    num_frames = int(round(seconds * config.fps))
    lead = LEAD_MOTIONS_CONTEXT if config.context else LEAD_MOTIONS
    segments = _plan_actor(rng, config, num_frames, lead, gap_s=(0.3, 3.0))
    if rng.random() < 0.5:
        segments += _plan_actor(rng, config, num_frames, {"dash": 1.0}, gap_s=(4.0, 15.0))
    segments += _plan_signals(rng, config, segments, num_frames)
    _label_dashes(segments, config.fps)
    if config.context:
        segments += _plan_context(np.random.default_rng([config.seed, index, 1]), config,
                                  segments, num_frames)
    camera = {"drift": [(rng.uniform(15, 40), rng.uniform(0, 2 * math.pi)) for _ in range(2)],
              "light": (rng.uniform(10, 30), rng.uniform(0, 2 * math.pi)),
              "texture_seed": int(rng.integers(2**31))}
    return VideoPlan(f"synth_{index:04d}", config.subset_of(index), num_frames, config.fps,
                     config.size, segments, camera)


def _plan_actor(rng, config: SynthConfig, num_frames: int, motions, gap_s) -> list[Segment]:
    """Episodes of one actor after another, until the video is full."""
    segments, misses = [], 0
    t = int(rng.uniform(0.3, 4.0) * config.fps)
    while misses < 5:  # near the end, a few shorter episodes may still fit
        episode = _plan_episode(rng, config, t, motions)
        if episode[-1].stop > num_frames - config.fps // 2:
            misses += 1
            continue
        segments += episode
        t = episode[-1].stop + int(rng.uniform(*gap_s) * config.fps)
    return segments


def _plan_episode(rng, config: SynthConfig, start: int, motions) -> list[Segment]:
    """A ball appears on the ring, rests, acts (1-3 touching motions), rests, and leaves; or, one
    time in seven, it is a distractor that only rests or drifts."""
    fps, size = config.fps, config.size
    hue, radius = (BALL_HUE + rng.uniform(-0.03, 0.03)) % 1.0, size * rng.uniform(0.15, 0.18)
    angle, ring = rng.uniform(0, 2 * math.pi), size * rng.uniform(0.22, 0.28)
    position = (size / 2 + ring * math.cos(angle), size / 2 + ring * math.sin(angle))
    if rng.random() < 0.15:
        plan = [str(rng.choice(["drift", "rest"]))]
    else:
        chain = 1 + int(rng.random() < 0.3) + int(rng.random() < 0.1)
        plan = ["rest"] + [str(rng.choice(list(motions), p=list(motions.values())))
                           for _ in range(chain)] + ["rest"]
    segments, t = [], start
    for motion in plan:
        params = _motion_params(rng, motion, fps)
        frames = _motion_frames(rng, motion, params, fps, alone=len(plan) == 1)
        if frames == 0:
            continue
        label = _motion_label(motion, params)
        segment = Segment(motion, t, t + frames, position, label, hue, radius, params, start)
        segments.append(segment)
        position = _end_position(segment, size, fps)
        t += frames
    return segments


def _plan_context(rng, config: SynthConfig, segments: list[Segment],
                  num_frames: int) -> list[Segment]:
    """The global-context family's cue: one corner square per video, whose colour labels every
    shake of the video; shakes within CONTEXT_GAP_S of it become rests (in place)."""
    fps = config.fps
    label = str(rng.choice(CONTEXT_CLASSES))
    on = int(CUE_ON_S * fps)
    # Near one end, so that most of the video lies beyond CONTEXT_GAP_S of it and can hold shakes.
    onset = int(rng.integers(0, int(CUE_EDGE_S * fps)))
    if rng.random() < 0.5:
        onset = num_frames - on - onset
    cue = Segment("cue", onset, onset + on, (0.0, 0.0), params={"label": label})
    gap = CONTEXT_GAP_S * fps
    for s in segments:
        if s.motion == "shake":
            if s.start - gap < cue.stop and cue.start < s.stop + gap:  # too near: no action
                s.motion, s.label, s.params = "rest", None, {}
            else:
                s.label = label
    return [cue]  # drawn last, over the balls


def _motion_params(rng, motion: str, fps: int) -> dict:
    if motion == "orbit":
        return {"clockwise": bool(rng.random() < 0.5), "period_s": rng.uniform(1.0, 1.6)}
    if motion == "bounce":
        fast = bool(rng.random() < 0.5)
        return {"fast": fast, "hz": rng.uniform(1.1, 1.5) if fast else rng.uniform(0.35, 0.5)}
    if motion == "dash":
        return {"swerve": rng.uniform(-0.6, 0.6), "signalled": bool(rng.random() < 0.4)}
    if motion == "drift":
        return {"swing": rng.uniform(0.4, 0.8), "period_s": rng.uniform(4.0, 8.0)}
    if motion == "shake":
        return {"hz": rng.uniform(2.5, 3.5)}
    return {}


def _motion_frames(rng, motion: str, params: dict, fps: int, alone: bool) -> int:
    """Length in frames: log-uniform in DURATION_RANGE_S; a bounce ends after whole half-trips
    (back on the ring), a shake after whole periods (where it started); the rests around an
    action may be empty (the ball appears moving)."""
    if motion == "rest" and not alone:
        return int(rng.uniform(0.0, 1.5) * fps)
    low, high = DURATION_RANGE_S[motion]
    seconds = math.exp(rng.uniform(math.log(low), math.log(high)))
    if motion == "bounce":
        seconds = max(1, round(seconds * 2 * params["hz"])) / (2 * params["hz"])
    if motion == "shake":
        seconds = max(1, round(seconds * params["hz"])) / params["hz"]
    return max(2, int(round(seconds * fps)))


def _motion_label(motion: str, params: dict) -> str | None:
    if motion == "orbit":
        return "orbit_cw" if params["clockwise"] else "orbit_ccw"
    if motion == "bounce":
        return "bounce_fast" if params["fast"] else "bounce_slow"
    if motion == "dash":
        return "dash"  # _label_dashes decides between dash and dash_after_signal
    if motion == "shake":
        return "shake"  # _plan_context labels it by the video's cue
    return None  # rest and drift are never actions


def _plan_signals(rng, config: SynthConfig, segments: list[Segment], num_frames: int):
    """Border flashes: one before about half of the dashes, plus a few that nothing follows."""
    fps = config.fps
    on = int(SIGNAL_ON_S * fps)
    onsets = [d.start - int(rng.uniform(1.5, SIGNAL_WINDOW_S - 1.0) * fps)
              for d in segments if d.motion == "dash" and d.params["signalled"]]
    onsets += list(rng.integers(0, num_frames - on, size=int(rng.integers(0, 3))))
    signals, busy_until = [], -1
    for onset in sorted(int(o) for o in onsets if o >= 0):
        if onset > busy_until:  # flashes never overlap: each is one visible event
            signals.append(Segment("signal", onset, onset + on, (0.0, 0.0)))
            busy_until = onset + on + fps // 2
    return signals


def _label_dashes(segments: list[Segment], fps: int) -> None:
    """The label of a dash follows from the flashes alone (the plan's intention is only a bias)."""
    onsets = [s.start for s in segments if s.motion == "signal"]
    window = SIGNAL_WINDOW_S * fps
    for s in segments:
        if s.motion == "dash":
            seen = any(s.start - window <= onset < s.start for onset in onsets)
            s.label = "dash_after_signal" if seen else "dash"


# ----------------------------------------------------------------------------------- motion


def offsets(segment: Segment, frames: np.ndarray, size: int, fps: int) -> np.ndarray:
    """Ball displacement from ``segment.origin`` at the given absolute frames, float [n, 2].

    Every motion is taken about the frame centre, where the ring around which balls rest is
    centred (camera drift aside): orbits run along the ring, bounces and dashes across it.
    """
    p = segment.params
    tau = (frames - segment.start) / fps
    start = np.asarray(segment.origin) - size / 2          # from the centre to the ball
    motion = segment.motion
    if motion in ("orbit", "drift"):
        if motion == "orbit":
            sign = 1.0 if p["clockwise"] else -1.0          # image y points down: + is clockwise
            turn = sign * 2 * math.pi * tau / p["period_s"]
        else:
            turn = p["swing"] * np.sin(2 * math.pi * tau / p["period_s"])
        return _rotate(start, turn) - start
    if motion == "bounce":
        phase = (p["hz"] * tau) % 1.0                       # 0 here, 0.5 opposite, 1 back
        return (-2.0 * np.minimum(2 * phase, 2 - 2 * phase))[:, None] * start[None, :]
    if motion == "shake":  # along the radius, 0.45 of the ring's radius each way
        swing = 0.45 * np.sin(2 * math.pi * p["hz"] * tau)
        return swing[:, None] * start[None, :]
    if motion == "dash":
        end = _rotate(-start, np.array([p["swerve"]]))[0]
        progress = (frames - segment.start) / max(segment.stop - segment.start - 1, 1)
        return np.clip(progress, 0.0, 1.0)[:, None] * (end - start)[None, :]
    return np.zeros((len(frames), 2))


def _rotate(vector: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """``vector`` [2] turned by each of ``angles`` [n] -> [n, 2]."""
    cos, sin = np.cos(angles), np.sin(angles)
    return np.stack([cos * vector[0] - sin * vector[1], sin * vector[0] + cos * vector[1]], 1)


def _end_position(segment: Segment, size: int, fps: int) -> tuple[float, float]:
    dx, dy = offsets(segment, np.array([segment.stop - 1]), size, fps)[0]
    return (segment.origin[0] + float(dx), segment.origin[1] + float(dy))


# ----------------------------------------------------------------------------------- rendering


def render_video(plan: VideoPlan, chunk: int = 128):
    """Yield the video's RGB frames as uint8 arrays [n, size, size, 3], ``chunk`` at a time."""
    size = plan.size
    rng = np.random.default_rng(plan.camera["texture_seed"])
    margin = int(math.ceil(size * CAMERA_DRIFT)) + 2
    texture = _texture(rng, size + 2 * margin)
    grid_y, grid_x = np.mgrid[0:size, 0:size].astype(np.float32)
    for first in range(0, plan.num_frames, chunk):
        frames = np.arange(first, min(first + chunk, plan.num_frames))
        image = _crop(texture, camera_shift(plan, frames) + margin, size)
        image *= _light(plan, frames)[:, None, None]
        image = np.repeat(image[..., None], 3, axis=3) * np.array([1.0, 0.97, 0.92], np.float32)
        for segment in plan.segments:  # flashes come last, so they are drawn over the balls
            active = (frames >= segment.start) & (frames < segment.stop)
            if active.any():
                _draw(image, active, plan, segment, frames[active], grid_x, grid_y)
        image += rng.normal(0.0, 0.02, image.shape[:3])[..., None].astype(np.float32)
        yield (np.clip(image, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def _texture(rng, side: int) -> np.ndarray:
    """Low-saturation clutter: smooth noise at a few scales, values around mid grey."""
    total = np.zeros((side, side), np.float32)
    for cells, weight in ((4, 0.6), (8, 0.3), (16, 0.15)):
        coarse = rng.normal(0, 1, (cells + 1, cells + 1)).astype(np.float32)
        axis = np.linspace(0, cells, side, dtype=np.float32)
        total += weight * _bilinear(coarse, axis[:, None], axis[None, :])
    total = (total - total.mean()) / (total.std() + 1e-6)
    return 0.45 + 0.04 * total


def _bilinear(image: np.ndarray, y, x) -> np.ndarray:
    """Sample ``image`` at fractional coordinates (broadcast together); edges are clamped."""
    y = np.clip(y, 0, image.shape[0] - 1.001)
    x = np.clip(x, 0, image.shape[1] - 1.001)
    y0, x0 = y.astype(np.int64), x.astype(np.int64)
    fy, fx = y - y0, x - x0
    top = image[y0, x0] * (1 - fx) + image[y0, x0 + 1] * fx
    bottom = image[y0 + 1, x0] * (1 - fx) + image[y0 + 1, x0 + 1] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)


def camera_shift(plan: VideoPlan, frames: np.ndarray) -> np.ndarray:
    """Slow camera drift in pixels, [n, 2] (x, y)."""
    amplitude = plan.size * CAMERA_DRIFT
    t = frames / plan.fps
    return np.stack([amplitude * np.sin(2 * math.pi * t / period + phase)
                     for period, phase in plan.camera["drift"]], 1).astype(np.float32)


def _light(plan: VideoPlan, frames: np.ndarray) -> np.ndarray:
    period, phase = plan.camera["light"]
    light = 1.0 + 0.06 * np.sin(2 * math.pi * frames / plan.fps / period + phase)
    return light.astype(np.float32)


def _crop(texture: np.ndarray, corner: np.ndarray, size: int) -> np.ndarray:
    pixels = np.arange(size, dtype=np.float32)
    y = corner[:, 1, None, None] + pixels[None, :, None]
    x = corner[:, 0, None, None] + pixels[None, None, :]
    return _bilinear(texture, y, x)


def ball_centres(plan: VideoPlan, segment: Segment, frames: np.ndarray) -> np.ndarray:
    """Where the segment's ball is on screen at ``frames``, float [n, 2] (x, y).

    Balls live in the world: the camera's drift since the ball appeared moves them on screen.
    """
    drift = camera_shift(plan, frames) - camera_shift(plan, np.array([segment.appeared]))
    return np.asarray(segment.origin) + offsets(segment, frames, plan.size, plan.fps) - drift


def _draw(image, active, plan: VideoPlan, segment: Segment, frames, grid_x, grid_y) -> None:
    """Paint the segment's ball (or the border flash, or the corner cue) into ``image[active]``
    in place."""
    if segment.motion == "signal":
        border = max(2, plan.size // 24)
        lit = image[active]
        for edge in (np.s_[:, :border], np.s_[:, -border:], np.s_[:, :, :border],
                     np.s_[:, :, -border:]):
            lit[edge] = 0.97
        image[active] = lit
        return
    if segment.motion == "cue":
        side = max(4, plan.size // 4)
        image[active, :side, :side] = np.array(CUE_COLOURS[segment.params["label"]], np.float32)
        return
    centre = ball_centres(plan, segment, frames).astype(np.float32)
    dist = np.hypot(grid_x[None] - centre[:, 0, None, None],
                    grid_y[None] - centre[:, 1, None, None])
    alpha = np.clip(segment.radius - dist + 0.5, 0.0, 1.0)[..., None]
    shade = (0.75 + 0.25 * np.clip(1 - dist / segment.radius, 0, 1))[..., None]
    colour = np.array(colorsys.hsv_to_rgb(segment.hue, 0.85, 0.95), np.float32)
    image[active] = image[active] * (1 - alpha) + alpha * shade * colour


# ----------------------------------------------------------------------------------- writing


def write_video(path, frame_chunks, fps: int, size: int) -> None:
    """Encode H.264 (yuv420p) via PyAV into ``path`` (a name or a seekable binary file),
    reproducibly: the same frames give the same bytes."""
    import av

    with av.open(path, "w", format="mp4") as container:
        # x264's macroblock-tree rate control (lookahead) gave other bytes for the same frames
        # now and then, even on one thread; without it the output is reproducible.
        options = {"crf": "20", "preset": "veryfast", "threads": "1",
                   "x264-params": "mbtree=0:rc-lookahead=0"}
        stream = container.add_stream("libx264", rate=fps, options=options)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.thread_count = 1
        for chunk in frame_chunks:
            for frame in chunk:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def generate(out_dir: str, config: SynthConfig, progress: bool = True) -> dict:
    """Write ``out_dir/videos/*.mp4`` and ``out_dir/annotations.json``; return the annotations.

    The annotation file is written last and atomically, so a directory without it is unfinished.
    """
    from tqdm import tqdm

    config.check()
    classes = benchmark_classes(config)
    os.makedirs(os.path.join(out_dir, VIDEO_DIR), exist_ok=True)
    database = {}
    for index in tqdm(range(config.videos), desc="synth", unit="video", disable=not progress):
        plan = plan_video(config, index)
        path = os.path.join(out_dir, VIDEO_DIR, plan.video_id + ".mp4")
        with open_output(path) as file:
            write_video(file, render_video(plan), plan.fps, plan.size)
        database[plan.video_id] = {"subset": plan.subset, "duration": plan.duration,
                                   "fps": plan.fps, "num_frames": plan.num_frames,
                                   "annotations": plan.annotations(classes)}
    annotations = {"version": VERSION, "classes": list(classes),
                   "context_classes": [c for c in classes if c in CONTEXT_CLASSES],
                   "synth": asdict(config), "database": database}
    write_output(os.path.join(out_dir, ANNOTATION_FILE), json.dumps(annotations, indent=1))
    return annotations
