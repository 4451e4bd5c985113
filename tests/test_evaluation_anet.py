"""The ActivityNet protocol: a class-agnostic detector whose detections video-level scores label.

Synthetic ActivityNet-like data written by the tests (we have no ActivityNet annotation file).
"""
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import cli
from evaluation import load_annotations
from evaluation.fusion import fuse_predictions
from helpers.evaluation_inputs import gt_dict, preds_dict, write_json
from helpers.training import CLASSES, synthetic_videos, tiny_config, write_annotations, write_store
from store import FeatureStore
from training.data import AGNOSTIC_LABEL, StoreDataset
from training.infer import infer
from training.train import train


def run_cli(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


@pytest.fixture(scope="module")
def anet_files(tmp_path_factory):
    """4 training and 2 validation videos in a store, and their annotations."""
    root = tmp_path_factory.mktemp("anet")
    videos = {**synthetic_videos(4, "training"), **synthetic_videos(2, "validation", first=4)}
    return write_store(root / "store.zarr", videos), write_annotations(root / "gt.json", videos)


# -- class-agnostic training -------------------------------------------------------------------
def test_class_agnostic_dataset_gives_every_action_the_one_class(anet_files):
    store_path, annotations_path = anet_files
    annotations = load_annotations(annotations_path)
    config = tiny_config(data={"class_agnostic": True})
    dataset = StoreDataset(FeatureStore.open(store_path), annotations, "training",
                           [AGNOSTIC_LABEL], [], config.data, train=True)
    labels = np.concatenate([t.labels for t in dataset.truth.values()])
    written = sum(len(v.labels) for v in annotations.videos("training").values())
    assert len(labels) == written and set(labels.tolist()) == {0}
    assert len({a for v in annotations.videos("training").values() for a in v.labels}) > 1


@pytest.mark.slow
def test_class_agnostic_training_learns_one_class_and_infer_labels_it(anet_files, tmp_path):
    store_path, annotations_path = anet_files
    # 30 epochs: with ActionFormer's recipe (lr 0 at step 0, crop jitter) 20 reach only 0.83.
    config = tiny_config(data={"class_agnostic": True}, model={"type": "head_only"},
                         train={"epochs": 30}, eval={"subset": "training", "every": 30},
                         head={"drop_path": 0.0})
    summary = train(config, store_path, annotations_path, tmp_path / "run", progress=False)
    # scored against every action relabelled as the one class
    assert summary["best"]["average_map"] >= 0.9
    checkpoint = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)
    assert checkpoint["classes"] == [AGNOSTIC_LABEL]
    assert checkpoint["ema"]["head.cls_tower.predict.conv.bias"].shape == (1,)
    predictions = infer(tmp_path / "run", store_path, annotations_path, subset="validation")
    labels = {d["label"] for items in predictions["results"].values() for d in items}
    assert labels == {AGNOSTIC_LABEL} and set(CLASSES).isdisjoint(labels)

    # infer --video-scores labels them with the function behind `fuse`
    scores = write_json(tmp_path / "scores.json", {"class": CLASSES, "results": {
        "v_video_004": [0.2, 0.7, 0.1], "v_video_005": [0.5, 0.1, 0.4]}})
    out = tmp_path / "fused.json"
    args = ["infer", "--run", tmp_path / "run", "--store", store_path, "--annotations",
            annotations_path, "--subset", "validation", "--out", out, "--quiet"]
    result = run_cli(*args, "--video-scores", scores, "--topk", "1")
    assert result.exit_code == 0, result.output
    fused = json.loads(out.read_text())
    assert fused == fuse_predictions(predictions, scores, topk=1)
    assert {d["label"] for d in fused["results"]["video_004"]} == {"Run"}
    assert {d["label"] for d in fused["results"]["video_005"]} == {"Jump"}
    # a video without scores stops it before inference, and nothing is written
    out.unlink()
    missing = write_json(tmp_path / "missing.json", {"results": {"video_004": {"Run": 1.0}}})
    result = run_cli(*args, "--video-scores", missing)
    assert result.exit_code == 2 and not out.exists()
    assert result.stderr == (f"error: {missing}: no scores for video 'video_005' "
                             f"(of {store_path})\n")


# -- fusion by hand ------------------------------------------------------------------------------
def agnostic(videos: dict) -> dict:
    """``{vid: [(start, end, score)]}`` -> class-agnostic predictions."""
    return preds_dict({vid: [(s, e, AGNOSTIC_LABEL, p) for s, e, p in items]
                       for vid, items in videos.items()})


def test_fusion_keeps_the_best_detections_and_emits_each_once_per_top_class():
    preds = agnostic({"a": [(0, 1, 0.25), (2, 3, 0.64), (4, 5, 0.01)]})
    scores = {"results": {"a": [0.09, 0.81, 0.36]}, "class": ["X", "Y", "Z"]}
    fused = fuse_predictions(preds, scores, topk=2, top_detections=2)["results"]["a"]
    # classes Y (0.81) then Z (0.36); detections 0.64 then 0.25; (4, 5) is cut
    assert [(d["label"], d["segment"]) for d in fused] == [
        ("Y", [2.0, 3.0]), ("Y", [0.0, 1.0]), ("Z", [2.0, 3.0]), ("Z", [0.0, 1.0])]
    expected = [math.sqrt(0.64 * 0.81), math.sqrt(0.25 * 0.81), math.sqrt(0.64 * 0.36),
                math.sqrt(0.25 * 0.36)]
    assert [d["score"] for d in fused] == expected  # bit for bit: sqrt(det x cls)
    np.testing.assert_allclose(expected, [0.72, 0.45, 0.48, 0.30], rtol=0, atol=1e-15)


def test_fusion_reads_scores_by_name_and_orders_ties_as_actionformer():
    preds = agnostic({"a": [(0, 1, 0.5), (2, 3, 0.5), (4, 5, 0.5)]})
    scores = {"results": {"a": {"X": 0.5, "Y": 0.2, "Z": 0.5}}}
    fused = fuse_predictions(preds, scores, topk=2, top_detections=2)["results"]["a"]
    # equal scores: the one listed later first (an ascending sort reversed)
    assert [(d["label"], d["segment"][0]) for d in fused] == [
        ("Z", 4.0), ("Z", 2.0), ("X", 4.0), ("X", 2.0)]
    assert {d["score"] for d in fused} == {0.5}


def straightforward_fusion(results: dict, scores: dict, classes: list, topk, top_detections):
    """ActionFormer's rule written out per video: best detections, best classes (equal values:
    the later one first), every detection once per class with score sqrt(det x cls)."""
    fused = {}
    for vid, items in results.items():
        best = sorted(range(len(items)), key=lambda i: (-items[i]["score"], -i))[:top_detections]
        top = sorted(range(len(classes)), key=lambda c: (-scores[vid][c], -c))[:topk]
        fused[vid] = [{"segment": [float(x) for x in items[i]["segment"]], "label": classes[c],
                       "score": math.sqrt(scores[vid][c] * items[i]["score"])}
                      for c in top for i in best]
    return fused


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_fusion_equals_the_straightforward_rule(data):
    values = st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.9, 1.0])  # few values: many ties
    classes = ["X", "Y", "Z", "W"][:data.draw(st.integers(1, 4))]
    videos = [f"v{i}" for i in range(data.draw(st.integers(1, 3)))]
    results = {vid: [{"segment": [float(s), float(s + d)], "label": AGNOSTIC_LABEL,
                      "score": data.draw(values)}
                     for s, d in data.draw(st.lists(st.tuples(st.integers(0, 50),
                                                              st.integers(0, 9)), max_size=8))]
               for vid in videos}
    scores = {vid: [data.draw(values) for _ in classes] for vid in videos}
    topk, top_detections = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 9))
    fused = fuse_predictions({"results": results}, {"results": scores, "class": classes},
                             topk, top_detections)
    assert fused["results"] == straightforward_fusion(results, scores, classes, topk,
                                                      top_detections)


@pytest.mark.parametrize("pred_id, score_id", [("v_abc", "abc"), ("abc", "v_abc"),
                                                ("v_abc", "v_abc")])
def test_video_ids_match_with_or_without_the_v_prefix(pred_id, score_id):
    scores = {"results": {score_id: [0.2, 0.8], "v_other": [1.0, 0.0]}, "class": ["X", "Y"]}
    fused = fuse_predictions(agnostic({pred_id: [(0, 1, 0.5)]}), scores, topk=1)
    assert list(fused["results"]) == [pred_id]  # the predictions' id is kept
    assert fused["results"][pred_id] == [{"segment": [0.0, 1.0], "label": "Y",
                                          "score": math.sqrt(0.5 * 0.8)}]


# -- the command: bad score files are one line, and nothing is written ----------------------------
GOOD_SCORES = {"results": {"v1": [0.9, 0.1]}, "class": ["A", "B"]}
BAD_SCORES = {
    "video without scores": ({"results": {"v2": [0.9, 0.1]}, "class": ["A", "B"]},
                             "no scores for video 'v1' (of PREDS)"),
    "wrong length": ({"results": {"v1": [0.9, 0.1, 0.3]}, "class": ["A", "B"]},
                     "video 'v1': 3 scores, expected 2 (one per name in 'class')"),
    "NaN": ('{"results": {"v1": [NaN, 0.1]}, "class": ["A", "B"]}',
            "video 'v1': scores must be finite numbers >= 0, got nan"),
    "infinite by name": ('{"results": {"v1": {"A": Infinity}}}',
                         "video 'v1': scores must be finite numbers >= 0, got inf"),
    "negative": ({"results": {"v1": {"A": -0.5}}},
                 "video 'v1': scores must be finite numbers >= 0, got -0.5"),
    "a string": ({"results": {"v1": ["0.9", 0.1]}, "class": ["A", "B"]},
                 "video 'v1': scores must be finite numbers >= 0, got '0.9'"),
    "list without class": ({"results": {"v1": [0.9, 0.1]}},
                           "video 'v1': expected an object {label: score} (or a list of scores "
                           "and a 'class' list)"),
    "class not names": ({"results": {"v1": [0.9]}, "class": [3]},
                        "'class' must be a non-empty array of class names"),
    "class twice": ({"results": {"v1": [0.9, 0.1]}, "class": ["A", "A"]},
                    "'class' names a class twice"),
    "no results": ({"class": ["A"]}, "'results' is missing"),
    "not JSON": ("{", "not valid JSON (Expecting property name enclosed in double quotes at "
                 "line 1)"),
}


@pytest.mark.parametrize("case", list(BAD_SCORES))
def test_bad_score_files_are_one_line_errors_and_nothing_is_written(case, tmp_path):
    content, problem = BAD_SCORES[case]
    preds = write_json(tmp_path / "preds.json", agnostic({"v1": [(0, 1, 0.5)]}))
    scores = tmp_path / "scores.json"
    scores.write_text(content if isinstance(content, str) else json.dumps(content))
    out = tmp_path / "fused.json"
    out.write_text("old")
    result = run_cli("fuse", "--preds", preds, "--video-scores", scores, "--out", out)
    assert result.exit_code == 2, result.output
    assert result.stdout == "" and result.stderr.count("\n") == 1
    assert result.stderr == f"error: {scores}: {problem.replace('PREDS', preds)}\n"
    assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == [
        "fused.json", "preds.json", "scores.json"]


def test_negative_detection_scores_cannot_be_fused(tmp_path):
    preds = write_json(tmp_path / "preds.json", agnostic({"v1": [(0, 1, -0.5)]}))
    scores = write_json(tmp_path / "scores.json", GOOD_SCORES)
    result = run_cli("fuse", "--preds", preds, "--video-scores", scores, "--out",
                     tmp_path / "out.json")
    assert result.exit_code == 2 and result.stderr.startswith(f"error: {preds}: detection scores")
    assert not (tmp_path / "out.json").exists()


# -- acceptance: the official pipeline's ActivityNet mAP, worked out by hand ----------------------
def test_fuse_then_evaluate_gives_the_activitynet_map_worked_out_by_hand(tmp_path):
    """ActivityNet ids without the prefix, CUHK scores keyed with it, as in the real files."""
    gt = gt_dict({"aaa": [(10, 30, "Surfing")], "bbb": [(0, 20, "Skiing"), (40, 50, "Skiing")],
                  "ccc": [(5, 15, "Diving")]}, subset="validation")
    gt["database"]["trn"] = {"subset": "training", "annotations": [
        {"segment": [0, 9], "label": "Diving"}]}
    detections = agnostic({"aaa": [(10, 30, 0.25), (12, 32, 0.64)],
                           "bbb": [(0, 20, 0.64), (40, 48.8, 0.49), (60, 70, 0.16)],
                           "ccc": [(5, 15, 0.16)]})
    scores = {"class": ["Surfing", "Skiing", "Diving"], "results": {
        "v_aaa": [0.81, 0.09, 0.36], "v_bbb": [0.25, 0.64, 0.04], "v_ccc": [0.16, 0.01, 0.81],
        "v_trn": [1.0, 0.0, 0.0]}}
    # Fused (sqrt(det x cls), top-2 classes):
    #   Surfing: aaa (12, 32) .72, aaa (10, 30) .45, bbb (0, 20) .40, bbb (40, 48.8) .35,
    #            bbb (60, 70) .20, ccc .16
    #   Skiing:  bbb (0, 20) .64, (40, 48.8) .56, (60, 70) .32
    #   Diving:  aaa (12, 32) .48, ccc (5, 15) .36, aaa (10, 30) .30
    # Surfing: (12, 32) has tIoU 18/22 with (10, 30): a hit up to 0.8, then (10, 30) is a
    #   duplicate: AP 1; at 0.85+ it misses and (10, 30) hits second: AP 1/2.
    # Skiing: (0, 20) hits; (40, 48.8) has tIoU 0.88: AP 1 up to 0.85, 1/2 at 0.9 and 0.95.
    # Diving: a miss, then the hit: AP 1/2 at every threshold.
    surfing = [1.0] * 7 + [0.5] * 3
    skiing = [1.0] * 8 + [0.5] * 2
    expected = [(a + b + 0.5) / 3 for a, b in zip(surfing, skiing)]
    assert sum(expected) / 10 == pytest.approx(0.75, abs=1e-15)

    preds = write_json(tmp_path / "agnostic.json", detections)
    scores_path = write_json(tmp_path / "cuhk.json", scores)
    fused = tmp_path / "fused.json"
    result = run_cli("fuse", "--preds", preds, "--video-scores", scores_path, "--out", fused)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"wrote 12 detections for 3 videos to {fused}\n"
    gt_path = write_json(tmp_path / "gt.json", gt)
    result = run_cli("evaluate", "--annotations", gt_path, "--preds", fused, "--dataset", "anet",
                     "--json", tmp_path / "report.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["subset"] == "validation" and report["num_detections"] == 12
    np.testing.assert_allclose(report["mAP"], expected, rtol=0, atol=1e-9)
    assert report["average_mAP"] == pytest.approx(0.75, abs=1e-9)
    assert report["per_class_AP"]["Diving"] == [0.5] * 10
