"""``detect`` end to end through the real command line: a synthetic benchmark extracted with the
demo's preset, a run trained on it, then a video file the store has never seen, twice (the
second call builds no backbone and extracts nothing); and timelines without ground truth."""
import json
import shutil
import time

import pytest

from extract import pipeline
from helpers.extraction import run_cli
from store import FeatureStore


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``(run, store, unseen video file, backbone checkpoint)``: a one-epoch demo-recipe run on
    4 synthetic videos, their features from the demo backbone with weights from a file."""
    import torch

    from extract.backbone import build_backbone
    from extract.config import load_preset
    from synth.generator import SynthConfig, generate

    root = tmp_path_factory.mktemp("detect")
    weights = root / "weights" / "demo_backbone.pth"
    weights.parent.mkdir()
    torch.manual_seed(11)
    torch.save(build_backbone(load_preset("synth").backbone).state_dict(), weights)
    generate(str(root / "bench"), SynthConfig(videos=4, min_seconds=8, max_seconds=10),
             progress=False)
    generate(str(root / "other"), SynthConfig(videos=2, seed=5, min_seconds=8, max_seconds=10),
             progress=False)
    unseen = root / "unseen.mp4"
    shutil.copy(next((root / "other" / "videos").glob("*.mp4")), unseen)
    store = root / "store.zarr"
    result = run_cli("extract", "--preset", "synth", "--videos", root / "bench" / "videos",
                     "--annotations", root / "bench" / "annotations.json", "--out", store,
                     "--checkpoint", weights, "--quiet")
    assert result.exit_code == 0, result.output
    result = run_cli("train", "--config", "demo/train", "--store", store, "--annotations",
                     root / "bench" / "annotations.json", "--epochs", "1", "--out",
                     root / "run", "--quiet")
    assert result.exit_code == 0, result.output
    return root / "run", store, unseen, weights


@pytest.mark.slow
def test_detect_extracts_an_unseen_video_once_and_writes_detections_and_a_figure(
        trained, tmp_path, monkeypatch):
    run, store, unseen, _ = trained
    out = tmp_path / "out"
    result = run_cli("detect", unseen, "--run", run, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("extracted 1 of 1 videos"), result.output
    detections = json.loads((out / "detections.json").read_text())["results"]
    assert list(detections) == ["unseen"] and detections["unseen"], detections
    assert all(entry["segment"][1] > entry["segment"][0] >= 0 for entry in detections["unseen"])
    assert (out / "unseen.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Extracted with the settings of the store the run was trained on.
    cached, trained_on = FeatureStore.open(out / "features.zarr").meta, FeatureStore.open(store).meta
    for key in ("backbone", "protocol", "tokens", "feature_dim"):
        assert cached[key] == trained_on[key], key

    def never(*args, **kwargs):
        raise AssertionError("a backbone was built")

    monkeypatch.setattr(pipeline, "Encoder", never)
    started = time.perf_counter()
    again = run_cli("detect", unseen, "--run", run, "--out", out, "--quiet")
    assert again.exit_code == 0, again.output
    assert again.stdout.startswith("extracted 0 of 1 videos"), again.output
    assert json.loads((out / "detections.json").read_text())["results"] == detections
    assert time.perf_counter() - started < 30


@pytest.mark.slow
def test_a_moved_backbone_checkpoint_is_asked_for_then_taken(trained, tmp_path):
    run, _, unseen, weights = trained
    moved = tmp_path / "elsewhere" / weights.name
    moved.parent.mkdir()
    shutil.move(weights, moved)
    try:
        result = run_cli("detect", unseen, "--run", run, "--out", tmp_path / "out", "--quiet")
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
        assert f"was extracted with the checkpoint demo_backbone.pth (recorded at {weights}, " \
            "not there now); give its path with --checkpoint" in result.stderr, result.stderr
        result = run_cli("detect", unseen, "--run", run, "--out", tmp_path / "out",
                         "--checkpoint", moved, "--quiet", "--no-figures")
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith("extracted 1 of 1 videos"), result.output
    finally:
        shutil.move(moved, weights)


def test_a_timeline_without_ground_truth_draws_detections_as_detections(tmp_path):
    from evaluation import timeline

    predictions = {"results": {"clip": [{"segment": [1.0, 3.0], "label": "Jump", "score": 0.9},
                                        {"segment": [5.0, 6.0], "label": "Run", "score": 0.4}]}}
    drawn = []
    original = timeline._draw

    def keep(*args):
        drawn.append(original(*args))
        return drawn[-1]

    timeline._draw = keep
    try:
        path = timeline.plot_timeline(None, predictions, "clip", tmp_path / "clip.png")
    finally:
        timeline._draw = original
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    (axes,) = drawn[0].axes
    assert [text.get_text() for text in axes.get_legend().get_texts()] == ["detection"]
    colours = {tuple(bars.get_facecolor()[0][:3]) for bars in axes.collections}
    from matplotlib.colors import to_rgb

    assert colours == {to_rgb(timeline.COLOURS["detection"])}
    assert "false positive" not in drawn[0].get_suptitle()
