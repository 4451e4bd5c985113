"""The demo end to end through the real command line, at a small size: generate, extract, train
both models, infer, evaluate, report; and how the two trainings run side by side."""
import json
import operator
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO

SMALL = ["--videos", "6", "--min-seconds", "10", "--max-seconds", "12", "--epochs", "2",
         "--quiet"]


def _demo(*args, cwd=None):
    # One torch thread in the child too, as the rest of the suite (conftest.py).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "cli.py"), "demo", *args],
                          capture_output=True, text=True, env=env, cwd=cwd)


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and \
        path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_demo_writes_the_report_figures_and_diagnosis(tmp_path):
    out = tmp_path / "demo"
    result = _demo("--out", str(out), "--seed", "1", *SMALL)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["seed"] == 1
    for model in ("losa", "head_only"):
        scores = report[model]
        assert len(scores["mAP"]) == 5 and all(0.0 <= v <= 1.0 for v in scores["mAP"])
        assert scores["average_mAP"] == pytest.approx(sum(scores["mAP"]) / 5)
        assert _is_png(out / model / "timeline.png")
        diagnosis = json.loads((out / model / "diagnosis" / "diagnosis.json").read_text())
        assert diagnosis["average_mAP"] == pytest.approx(scores["average_mAP"])
        assert {"false_positives", "sensitivity"} <= set(diagnosis)
        for figure in ("false_positives.png", "sensitivity.png"):
            assert _is_png(out / model / "diagnosis" / figure)
        predictions = json.loads((out / model / "predictions.json").read_text())["results"]
        test_videos = {vid for vid, video in json.loads(
            (out / "benchmark" / "annotations.json").read_text())["database"].items()
            if video["subset"] == "test"}
        assert set(predictions) == test_videos
    assert set(report["seconds"]) == {"synth", "extract", "train", "evaluate"}
    assert all(v >= 0 for v in report["seconds"].values())
    markdown = (out / "report.md").read_text()
    assert "| losa |" in markdown and "| head_only |" in markdown
    assert "losa/timeline.png" in markdown
    assert _is_png(out / "sensitivity.png") and "(sensitivity.png)" in markdown
    # The side-by-side table is printed, one row per model.
    assert "head_only" in result.stdout and "average" in result.stdout

    # A rerun replaces the previous demo's output instead of refusing or mixing it.
    (out / "runs" / "losa" / "stale.txt").write_text("from the first run")
    again = _demo("--out", str(out), "--seed", "1", *SMALL)
    assert again.returncode == 0, again.stderr[-2000:]
    assert not (out / "runs" / "losa" / "stale.txt").exists()


def test_refuses_a_folder_that_holds_other_files(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    result = _demo("--out", str(tmp_path), *SMALL)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {tmp_path}: folder is not empty")
    assert result.stderr.count("\n") == 1
    assert (tmp_path / "mine.txt").read_text() == "keep me"


@pytest.mark.slow
def test_refuses_a_checkpoint_that_does_not_fit_the_demo_backbone(tmp_path):
    import torch

    from extract.backbone import build_backbone

    wrong = build_backbone({"preset": "vit_s", "img_size": 64, "depth": 2, "embed_dim": 64,
                            "num_heads": 2})
    torch.save(wrong.state_dict(), tmp_path / "small.pth")
    result = _demo("--out", str(tmp_path / "out"), "--checkpoint", str(tmp_path / "small.pth"),
                   *SMALL)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {tmp_path / 'small.pth'}: does not fit")
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists(), "refused before anything is written"
    missing = _demo("--out", str(tmp_path / "out"), "--checkpoint", str(tmp_path / "no.pth"),
                    *SMALL)
    assert missing.returncode == 2 and "checkpoint file not found" in missing.stderr


def test_bad_options_are_one_line_errors(tmp_path):
    for args, message in ((["--epochs", "0"], "error: --epochs: must be at least 1"),
                          (["--videos", "1"], "error: --videos: must be at least 2")):
        result = _demo("--out", str(tmp_path / "o"), *args)
        assert result.returncode == 2 and result.stderr.startswith(message), result.stderr
        assert result.stderr.count("\n") == 1


# The two trainings run side by side in spawned processes. Plain library functions stand in for
# them here: a spawned child can import those, and they fail or stall on demand.

def test_side_by_side_runs_every_job_and_ticks(tmp_path):
    import shutil

    from synth.demo import run_side_by_side

    source = tmp_path / "source.txt"
    source.write_text("payload")
    ticks = []
    run_side_by_side({name: (shutil.copyfile, (source, tmp_path / f"{name}.txt"))
                      for name in ("losa", "head_only")},
                     on_tick=lambda: ticks.append(1), tick_seconds=0.05)
    assert (tmp_path / "losa.txt").read_text() == (tmp_path / "head_only.txt").read_text() \
        == "payload"
    assert ticks


@pytest.mark.parametrize("failing, error, message", [
    ((operator.truediv, (1, 0)), ZeroDivisionError, "division by zero"),
    ((os._exit, (3,)), RuntimeError, r"^bad: the process died \(exit code 3\)$"),
])
def test_side_by_side_stops_the_other_job_at_the_first_failure(failing, error, message):
    from synth.demo import run_side_by_side

    started = time.monotonic()
    with pytest.raises(error, match=message):
        run_side_by_side({"slow": (time.sleep, (600,)), "bad": failing}, tick_seconds=0.05)
    # Not a speed target: without the stop this call would take the full ten minutes.
    assert time.monotonic() - started < 120
