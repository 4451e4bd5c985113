"""``evaluate --diagnose``: false-positive categories and mAP sensitivity on hand-made cases."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from evaluation import diagnose, evaluate_detections, write_diagnosis
from evaluation.diagnosis import FALSE_POSITIVE_TYPES, TRUE_POSITIVE, classify_false_positives
from helpers.evaluation_inputs import gt_dict, preds_dict, write_json

# One video, A at (0, 10) and B at (20, 30); at tIoU 0.5 each detection is one kind of outcome.
CASES = [
    ((0, 10, "A", 0.9), "true_positive"),
    ((0, 10, "A", 0.8), "double_detection"),  # A's ground truth is already taken
    ((0, 10, "B", 0.7), "wrong_label"),  # tIoU 1 with A's ground truth
    ((0, 3, "A", 0.6), "localization"),  # tIoU 0.3 with its own class
    ((0, 3, "B", 0.5), "confusion"),  # tIoU 0.3 with another class
    ((40, 50, "A", 0.4), "background"),
    ((20, 30, "B", 0.3), "true_positive"),
]
GT = gt_dict({"v1": [(0, 10, "A"), (20, 30, "B")]})


@pytest.fixture
def evaluation():
    return evaluate_detections(GT, preds_dict({"v1": [d for d, _ in CASES]}), tiou_thresholds=[0.5])


def test_each_false_positive_gets_its_category(evaluation):
    types = classify_false_positives(evaluation)[0]
    names = ["true_positive" if t == TRUE_POSITIVE else FALSE_POSITIVE_TYPES[t] for t in types]
    detections = evaluation.detections
    found = {(tuple(s), evaluation.gt.classes[c], x): name for s, c, x, name
             in zip(detections.segments.tolist(), detections.label, detections.scores, names)}
    assert found == {((s, e), label, x): name for (s, e, label, x), name in CASES}


def test_breakdown_counts_and_the_gain_of_removing_each_error(evaluation):
    result = diagnose(evaluation)
    entry = result["false_positives"]["per_threshold"][0]
    assert entry["true_positives"] == 2
    assert entry["false_positives"] == {name: 1 for name in FALSE_POSITIVE_TYPES}
    # Class A's hit ranks first, so its errors cost nothing; B ranks miss, miss, hit (AP 1/3),
    # and removing one of its two misses gives AP 1/2: mAP gains (1/2 - 1/3) / 2.
    gain = result["removal_gain"]
    assert gain["wrong_label"] == pytest.approx(1 / 12) and gain["confusion"] == pytest.approx(1 / 12)
    assert gain["double_detection"] == gain["localization"] == gain["background"] == 0.0


def test_breakdown_counts_only_the_best_ten_per_ground_truth():
    misses = [(50 + i, 51 + i, "A", 0.5) for i in range(15)]
    evaluation = evaluate_detections(GT, preds_dict({"v1": misses + [(20, 30, "B", 0.9)]}),
                                     tiou_thresholds=[0.5])
    counts = diagnose(evaluation)["false_positives"]["per_threshold"][0]["false_positives"]
    assert counts["background"] == 10


def test_sensitivity_to_length_and_instances():
    gt = gt_dict({"v1": [(0, 2, "A"), (10, 30, "A"), (40, 45, "B"), (50, 55, "B")],
                  "v2": [(0, 8, "B")]})
    # finds the long A and v2's lone B: short actions and crowded videos are missed
    preds = preds_dict({"v1": [(10, 30, "A", 0.9), (60, 70, "B", 0.8)], "v2": [(0, 8, "B", 0.7)]})
    result = diagnose(evaluate_detections(gt, preds, tiou_thresholds=[0.5, 0.7]))
    length = {b["name"]: b for b in result["sensitivity"]["length"]["bins"]}
    assert length["XS"]["num_gt"] == 1 and length["XS"]["average_mAP_N"] == 0.0
    assert length["XL"]["num_gt"] == 1 and length["XL"]["average_mAP_N"] == 1.0
    assert length["M"]["num_gt"] == 1 and length["M"]["num_classes"] == 1
    assert length["L"]["num_gt"] == 0 and length["L"]["average_mAP_N"] is None
    instances = {b["name"]: b for b in result["sensitivity"]["instances"]["bins"]}
    assert instances["XS"]["num_gt"] == 1 and instances["S"]["num_gt"] == 4
    # the lone B in v2: hit ranked after one background miss; N = 5 gt / 2 classes
    n = 5 / 2
    assert instances["XS"]["average_mAP_N"] == pytest.approx(n / (n + 1))
    assert 0.0 < instances["S"]["average_mAP_N"] < instances["XS"]["average_mAP_N"]


def test_diagnosis_files_and_cli(tmp_path):
    gt = write_json(tmp_path / "gt.json", GT)
    preds = write_json(tmp_path / "preds.json", preds_dict({"v1": [d for d, _ in CASES]}))
    result = CliRunner().invoke(cli.main, ["evaluate", "--annotations", gt, "--preds", preds,
                                           "--diagnose", str(tmp_path / "diag")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "diag" / "diagnosis.json").read_text())
    assert set(report) >= {"false_positives", "removal_gain", "sensitivity"}
    assert report["tiou_thresholds"] == np.linspace(0.3, 0.7, 5).tolist()
    for name in ("false_positives.png", "sensitivity.png"):
        data = (tmp_path / "diag" / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000
    assert f"wrote {tmp_path / 'diag' / 'sensitivity.png'}" in result.stdout


def test_write_diagnosis_returns_what_it_wrote(evaluation, tmp_path):
    paths = write_diagnosis(diagnose(evaluation), tmp_path)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["diagnosis.json", "false_positives.png",
                                                    "sensitivity.png"]
