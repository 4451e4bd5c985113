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
from synth.generator import ANNOTATION_FILE, CLASSES, VIDEO_DIR, generate

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
