"""The synthetic benchmark: deterministic bytes, a well-formed annotation file, videos that decord
decodes as annotated, and balls that move exactly inside the annotated actions."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import REPO
from synth.config import SynthConfig
from synth.generator import (ANNOTATION_FILE, CLASSES, CONTEXT_CLASSES, CONTEXT_GAP_S, CUE_COLOURS,
                              VERSION, VIDEO_DIR, generate, plan_video)

SMALL = dict(videos=3, size=64, fps=15, min_seconds=10.0, max_seconds=14.0)


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    annotations = generate(str(out), SynthConfig(seed=3, **SMALL), progress=False)
    return out, annotations


def _video_bytes(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted((Path(folder) / VIDEO_DIR).glob("*.mp4"))}


def test_same_seed_same_bytes_other_seed_other_videos(benchmark, tmp_path):
    out, annotations = benchmark
    again = generate(str(tmp_path / "again"), SynthConfig(seed=3, **SMALL), progress=False)
    assert again == annotations
    assert _video_bytes(tmp_path / "again") == _video_bytes(out)
    assert (tmp_path / "again" / ANNOTATION_FILE).read_bytes() == \
        (out / ANNOTATION_FILE).read_bytes()
    other = generate(str(tmp_path / "other"), SynthConfig(seed=4, **SMALL), progress=False)
    assert other["database"] != annotations["database"]
    assert set(_video_bytes(tmp_path / "other").values()).isdisjoint(_video_bytes(out).values())


def test_annotation_file_schema(benchmark):
    from evaluation import load_annotations

    out, _ = benchmark
    raw = json.loads((out / ANNOTATION_FILE).read_text())
    parsed = load_annotations(str(out / ANNOTATION_FILE))
    assert sorted(parsed.subsets) == ["test", "train"]
    assert parsed.test_subset == "test" and parsed.train_subset == "train"
    assert set(parsed.classes) <= set(CLASSES) and raw["classes"] == list(CLASSES)
    assert [v["subset"] for v in raw["database"].values()] == ["train", "train", "test"]
    for video in raw["database"].values():
        assert 10.0 <= video["duration"] <= 14.0
        assert video["num_frames"] == round(video["duration"] * video["fps"])
        assert video["annotations"], "every video holds actions"
        for action in video["annotations"]:
            start, end = action["segment"]
            assert 0 <= start < end <= video["duration"]
            assert action["label"] in CLASSES
            assert action["label_id"] == CLASSES.index(action["label"])


def test_decord_reads_every_video_as_annotated(benchmark):
    import decord

    out, annotations = benchmark
    for video_id, video in annotations["database"].items():
        reader = decord.VideoReader(str(out / VIDEO_DIR / f"{video_id}.mp4"))
        assert len(reader) == video["num_frames"]
        assert reader.get_avg_fps() == pytest.approx(video["fps"])
        assert reader[0].shape == (64, 64, 3)


def _ball_speed(frames: np.ndarray) -> np.ndarray:
    """Per frame pair, how far the centroid of the red ball pixels moved (pixels); NaN where no
    ball is seen or the amount of red changes (a ball appearing, leaving or overlapping)."""
    rgb = frames.astype(np.int16)
    red = (rgb[..., 0] > 140) & (rgb[..., 1] < 110) & (rgb[..., 2] < 110)
    count = red.sum(axis=(1, 2)).astype(float)
    ys, xs = np.mgrid[0:frames.shape[1], 0:frames.shape[2]]
    with np.errstate(invalid="ignore", divide="ignore"):
        centre = np.stack([(red * xs).sum((1, 2)), (red * ys).sum((1, 2))], 1) / count[:, None]
        speed = np.hypot(*np.diff(centre, axis=0).T)
        steady = np.abs(np.diff(count)) <= 0.15 * np.minimum(count[:-1], count[1:])
    speed[~steady | (count[:-1] < 20) | (count[1:] < 20)] = np.nan
    return speed


def test_balls_move_inside_actions_and_rest_outside(benchmark):
    """From decoded pixels: inside every annotated action a ball moves (several pixels a frame),
    and in the frames no action covers the balls are still or drift slowly."""
    import decord

    out, annotations = benchmark
    for video_id, video in annotations["database"].items():
        frames = decord.VideoReader(str(out / VIDEO_DIR / f"{video_id}.mp4"))[:].asnumpy()
        speed = _ball_speed(frames)  # speed[i]: frame i -> i + 1
        inside = np.zeros(len(speed), bool)
        for action in video["annotations"]:
            first, stop = (round(t * video["fps"]) for t in action["segment"])
            moving = speed[first:stop - 1]
            inside[max(first - 1, 0):stop] = True
            if np.isfinite(moving).sum() >= 3:
                assert np.nanmedian(moving) > 1.0, (video_id, action)
        outside = speed[~inside]
        assert np.isfinite(outside).sum() > 20, video_id
        assert np.nanmedian(outside) < 0.5, video_id
        assert np.nanpercentile(outside, 90) < 1.0, video_id


@pytest.mark.parametrize("args, message", [
    (["--videos", "1"], "error: --videos: must be at least 2"),
    (["--size", "40"], "error: --size: must be a multiple of 16"),
    (["--min-seconds", "30", "--max-seconds", "20"], "error: --min-seconds: must be at least 8"),
    (["--test-fraction", "1.5"], "error: --test-fraction: must be between 0 and 1"),
    (["--seed", "-2"], "error: --seed: must be zero or more"),
])
def test_bad_options_are_one_line_errors(tmp_path, args, message):
    result = subprocess.run([sys.executable, str(REPO / "cli.py"), "synth", "--out",
                             str(tmp_path / "b"), "--quiet", *args],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 2
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1
    assert not (tmp_path / "b").exists(), "nothing is written for a refused command"


def test_cli_writes_the_benchmark(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "cli.py"), "synth", "--out",
                             str(tmp_path / "c"), "--videos", "2", "--min-seconds", "8",
                             "--max-seconds", "8.5", "--seed", "5", "--quiet"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "c" / ANNOTATION_FILE).read_text())
    assert written["synth"]["seed"] == 5 and len(written["database"]) == 2
    assert sorted(p.name for p in (tmp_path / "c" / VIDEO_DIR).iterdir()) == \
        ["synth_0000.mp4", "synth_0001.mp4"]
    assert "wrote 2 videos" in result.stdout


def test_context_cue_lies_beyond_the_heads_field_where_shakes_are_detected(monkeypatch):
    """Every global-context action is at least CONTEXT_GAP_S from its video's cue, and that gap
    exceeds what the demo head sees from a shake: at every pyramid level whose regression range
    can hold a shake, the level's reach (bench/long_range.py's receptive_field, worked out by
    hand in tests/test_ablate.py) plus one clip at each end (a step's clip spans 16 frames)."""
    # Only for this test: bench/extract.py would shadow the extract package for later tests.
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    from long_range import receptive_field

    from store.protocol import SamplingProtocol
    from synth.demo import TRAIN_CONFIG
    from training.config import load_config

    config = SynthConfig(seed=0, context=True)
    classes = CLASSES + CONTEXT_CLASSES
    lengths, labels = [], set()
    for index in range(config.videos):
        plan = plan_video(config, index)
        (cue,) = [s for s in plan.segments if s.motion == "cue"]
        for action in plan.annotations(classes):
            if action["label"] in CONTEXT_CLASSES:
                start, end = (round(t * plan.fps) for t in action["segment"])
                gap = max(cue.start - end, start - cue.stop) / plan.fps
                assert gap >= CONTEXT_GAP_S, (index, action)
                assert action["label"] == cue.params["label"]  # the cue's colour decides
                lengths.append((end - start) / plan.fps)
                labels.add(action["label"])
    assert labels == set(CONTEXT_CLASSES) and len(lengths) > 20

    protocol = SamplingProtocol()
    step_s = protocol.clip_stride / config.fps
    clip_s = protocol.clip_len / config.fps
    ranges = load_config(TRAIN_CONFIG).head.regression_ranges
    detecting = [level for level, (low, high) in enumerate(ranges)
                 if any(low <= n / step_s and (high is None or n / step_s < high)
                        for n in lengths)]
    assert detecting, "shakes fall in some level's regression range"
    reach = receptive_field()
    for level in detecting:
        seen = max(reach[level]["steps_before"], reach[level]["steps_after"]) * step_s + clip_s
        assert seen < CONTEXT_GAP_S, (level, seen)


def test_context_classes_are_named_deterministic_and_drawn(tmp_path):
    """With ``context``: the metadata names the family, the same seed writes the same bytes,
    the first ball shakes (without the family nothing shakes and no cue is drawn), and the
    cue's colour is in the decoded corner while it is lit."""
    import decord

    small = dict(videos=2, size=32, fps=15, min_seconds=30.0, max_seconds=32.0, seed=2)
    first = generate(str(tmp_path / "a"), SynthConfig(context=True, **small), progress=False)
    again = generate(str(tmp_path / "b"), SynthConfig(context=True, **small), progress=False)
    assert first == again and _video_bytes(tmp_path / "a") == _video_bytes(tmp_path / "b")
    assert first["version"] == VERSION
    assert first["classes"] == list(CLASSES + CONTEXT_CLASSES)
    assert first["context_classes"] == list(CONTEXT_CLASSES)
    plain = SynthConfig(context=False, **small)
    assert generate(str(tmp_path / "c"), plain, progress=False)["context_classes"] == []
    motions = {s.motion for index in range(4) for s in plan_video(plain, index).segments}
    assert motions.isdisjoint({"shake", "cue"})
    shaken = [s for index in range(4)
              for s in plan_video(SynthConfig(context=True, **small), index).segments
              if s.motion == "shake"]
    assert shaken and all(s.label in CONTEXT_CLASSES for s in shaken)
    for index in range(2):
        (cue,) = [s for s in plan_video(SynthConfig(context=True, **small), index).segments
                  if s.motion == "cue"]
        frames = decord.VideoReader(str(tmp_path / "a" / VIDEO_DIR / f"synth_{index:04d}.mp4"))
        lit = frames[(cue.start + cue.stop) // 2].asnumpy()[2:6, 2:6].mean((0, 1)) / 255
        assert np.abs(lit - np.array(CUE_COLOURS[cue.params["label"]])).max() < 0.12
