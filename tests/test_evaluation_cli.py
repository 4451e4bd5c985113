"""``python cli.py evaluate``: output, report, plots, and a one-line error for every bad input."""
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

import cli
from helpers import REPO
from helpers.evaluation_inputs import (ACTIONFORMER_FILE, OPENTAD_FILE, gt_dict, needs_thumos,
                                       preds_dict, write_json)


def run_cli(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


@pytest.fixture
def files(tmp_path):
    gt = gt_dict({"v1": [(0, 10, "A"), (20, 30, "B")], "v2": [(5, 9, "A")]}, subset="Test")
    preds = preds_dict({"v1": [(0, 10, "A", 0.9), (21, 30, "B", 0.8), (40, 50, "A", 0.95)],
                        "v2": [(5, 8, "A", 0.7)]})
    return write_json(tmp_path / "gt.json", gt), write_json(tmp_path / "preds.json", preds)


def test_evaluate_prints_the_table_and_writes_the_json_report(files, tmp_path):
    gt, preds = files
    out = tmp_path / "deep" / "report.json"
    result = run_cli("evaluate", "--annotations", gt, "--preds", preds, "--subset", "test",
                     "--tiou", "0.5,0.8", "--json", out, "--per-class")
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["tiou_thresholds"] == [0.5, 0.8] and report["subset"] == "Test"
    # A: miss, hit, hit of 2 -> envelope 2/3 over all recall at 0.5; at 0.8 (5, 8) misses
    # (tIoU 0.75): miss, hit, miss -> 1/2 * 1/2
    assert report["per_class_AP"] == {"A": [pytest.approx(2 / 3), 0.25], "B": [1.0, 1.0]}
    assert report["mAP"] == [pytest.approx((2 / 3 + 1) / 2), 0.625]
    assert report["average_mAP"] == pytest.approx((report["mAP"][0] + report["mAP"][1]) / 2)
    assert report["num_gt"] == {"A": 2, "B": 1}
    lines = result.stdout.splitlines()
    assert lines[0] == "subset 'Test': 2 videos, 3 ground-truth segments in 2 classes, 4 detections"
    assert lines[2].split() == ["mAP", "(%)", "83.33", "62.50", "72.92"]
    assert lines[-2].split() == ["A", "66.67", "25.00", "45.83"]


def test_evaluate_dataset_presets_and_the_default_subset(files, tmp_path):
    gt, preds = files
    result = run_cli("evaluate", "--annotations", gt, "--preds", preds, "--dataset", "anet",
                     "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["tiou_thresholds"]) == 10 and report["subset"] == "Test"


def test_evaluate_warns_on_stderr_about_ignored_labels(files, tmp_path):
    gt, _ = files
    preds = write_json(tmp_path / "p.json", preds_dict({"v1": [(0, 10, "Unknown", 1.0)]}))
    result = run_cli("evaluate", "--annotations", gt, "--preds", preds)
    assert result.exit_code == 0
    assert f"warning: {preds}: ignored 1 detections of labels without ground truth" in result.stderr
    assert "Unknown" in result.stderr


def test_detections_on_other_videos_count_as_false_positives_unless_ignored(files, tmp_path):
    gt, _ = files
    preds = write_json(tmp_path / "p.json", preds_dict({
        "v1": [(0, 10, "A", 0.5), (20, 30, "B", 0.5)], "v2": [(5, 9, "A", 0.4)],
        "train_1": [(0, 10, "A", 0.9)], "train_2": [(0, 10, "B", 0.9), (5, 10, "B", 0.8)]}))
    args = ["evaluate", "--annotations", gt, "--preds", preds, "--tiou", "0.5", "--json"]
    result = run_cli(*args, tmp_path / "fp.json")
    assert result.exit_code == 0, result.output
    assert result.stderr == (f"warning: {preds}: 3 detections on 2 videos outside subset 'Test' "
                             "count as false positives\n")
    # A: miss, hit, hit of 2 -> 2/3; B: miss, miss, hit -> 1/3
    report = json.loads((tmp_path / "fp.json").read_text())
    assert report["per_class_AP"] == {"A": [pytest.approx(2 / 3)], "B": [pytest.approx(1 / 3)]}
    result = run_cli(*args, tmp_path / "ignored.json", "--ignore-other-videos")
    assert result.exit_code == 0, result.output
    assert "3 detections on 2 videos outside subset 'Test' are ignored" in result.stderr
    assert json.loads((tmp_path / "ignored.json").read_text())["mAP"] == [1.0]


def test_evaluate_writes_plots(files, tmp_path):
    gt, preds = files
    result = run_cli("evaluate", "--annotations", gt, "--preds", preds, "--plot", tmp_path / "plots")
    assert result.exit_code == 0, result.output
    for name in ("per_class_ap.png", "precision_recall.png"):
        data = (tmp_path / "plots" / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000


@needs_thumos
def test_evaluate_on_real_thumos_defaults_to_its_test_split(tmp_path):
    # Perfect detections for the OpenTAD file's test split, scored under both layouts' names.
    from evaluation import load_annotations

    videos = load_annotations(OPENTAD_FILE).videos()
    preds = write_json(tmp_path / "p.json", preds_dict(
        {vid: [(*s, label, 1.0) for s, label in zip(v.segments, v.labels)]
         for vid, v in videos.items()}))
    result = run_cli("evaluate", "--annotations", OPENTAD_FILE, "--preds", preds)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("subset 'validation': 211 videos")
    assert result.stdout.splitlines()[2].split()[2:] == ["100.00"] * 6
    result = run_cli("evaluate", "--annotations", ACTIONFORMER_FILE, "--preds", preds)
    assert result.exit_code == 0 and result.stdout.startswith("subset 'Test': 212 videos")


def test_evaluate_runs_without_torch_or_matplotlib(files):
    gt, preds = files
    code = ("import runpy, sys\n"
            f"sys.argv = ['cli.py', 'evaluate', '--annotations', {gt!r}, '--preds', {preds!r}]\n"
            "try:\n    runpy.run_path('cli.py', run_name='__main__')\n"
            "except SystemExit as exit:\n    assert not exit.code, exit.code\n"
            "heavy = [m for m in ('torch', 'matplotlib', 'decord') if m in sys.modules]\n"
            "print('heavy modules:', heavy)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, check=True)
    assert "heavy modules: []" in result.stdout


def test_speed_benchmark_runs_and_agrees_with_the_reference():
    result = subprocess.run([sys.executable, "bench/eval_speed.py", "--detections", "4000",
                             "--videos", "20", "--repeat", "1"], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert "speed ratio reference / whole cli command:" in result.stdout
    assert "ratio evaluate / bare parse:" in result.stdout
    assert "ratio fuse / bare parse of its input:" in result.stdout


# -- bad input: one line naming the file, exit status 2 ------------------------------------------
GOOD_GT = gt_dict({"v1": [(0, 10, "A")]})
GOOD_PREDS = preds_dict({"v1": [(0, 10, "A", 0.5)]})


def bad_detection(**fields):
    detection = {"segment": [0, 10], "label": "A", "score": 0.5}
    detection.update(fields)
    return {"results": {"v1": [{k: v for k, v in detection.items() if v != "<missing>"}]}}


def bad_annotation(**fields):
    annotation = {"segment": [0, 10], "label": "A"}
    annotation.update(fields)
    return {"database": {"v1": {"subset": "test", "annotations": [
        {k: v for k, v in annotation.items() if v != "<missing>"}]}}}


BAD_PREDICTIONS = {
    "not JSON": ("{'results': ", "not valid JSON"),
    "not an object": ("[1, 2]", "expected a JSON object, found list"),
    "no results": ({"database": {}}, "'results' is missing"),
    "results not an object": ({"results": [1]}, "'results' must be a JSON object"),
    "video not an array": ({"results": {"v1": {"segment": [0, 1]}}},
                           "video 'v1': expected an array of detections"),
    "detection not an object": ({"results": {"v1": [3]}}, "detection 0: expected an object"),
    "segment missing": (bad_detection(segment="<missing>"), "detection 0: 'segment' is missing"),
    "one number": (bad_detection(segment=[1]), "segment must be two finite numbers, got [1]"),
    "three numbers": (bad_detection(segment=[1, 2, 3]), "segment must be two finite numbers"),
    "a string": (bad_detection(segment=["0", "1"]), "segment must be two finite numbers"),
    "NaN": ('{"results": {"v1": [{"segment": [NaN, 1], "label": "A", "score": 1}]}}',
            "segment must be two finite numbers, got [nan, 1]"),
    "end before start": (bad_detection(segment=[5, 2]), "segment ends before it starts (5.0 > 2.0)"),
    "label missing": (bad_detection(label="<missing>"), "'label' is missing"),
    "label a number": (bad_detection(label=3), "'label' must be a class name (string), got 3"),
    "score missing": (bad_detection(score="<missing>"), "detection 0: 'score' is missing"),
    "score infinite": ('{"results": {"v1": [{"segment": [0, 1], "label": "A", "score": Infinity}]}}',
                       "'score' must be a finite number, got inf"),
    "score a string": (bad_detection(score="high"), "'score' must be a finite number, got 'high'"),
    "score null": (bad_detection(score=None), "'score' must be a finite number, got None"),
    "wrong video ids": (preds_dict({"v1.mp4": [(0, 1, "A", 1.0)]}),
                        "none of its 1 videos is in subset 'test'"),
}

BAD_GROUND_TRUTH = {
    "not JSON": ("", "not valid JSON"),
    "no database": ({"results": {}}, "'database' is missing"),
    "empty database": ({"database": {}}, "'database' has no videos"),
    "video not an object": ({"database": {"v1": []}}, "video 'v1': expected an object"),
    "annotations not an array": ({"database": {"v1": {"annotations": {}}}},
                                 "'annotations' must be an array"),
    "segment not numbers": (bad_annotation(segment=[0, None]), "annotation 0: segment must be two"),
    # the peers disagree on a reversed segment; we refuse it, naming the video
    "end before start": (bad_annotation(segment=[3, 1]),
                         "video 'v1', annotation 0: segment ends before it starts (3.0 > 1.0)"),
    "label missing": (bad_annotation(label="<missing>"), "annotation 0: 'label' is missing"),
    "negative duration": ({"database": {"v1": {"duration": -1, "annotations": []}}},
                          "'duration' must be a finite number >= 0.0, got -1"),
    "zero fps": ({"database": {"v1": {"fps": 0, "annotations": []}}},
                 "'fps' must be a finite number > 0.0"),
    "fractional frames": ({"database": {"v1": {"frame": 2.5, "annotations": []}}},
                          "'frame' must be a whole number of frames"),
    "subset not a string": ({"database": {"v1": {"subset": 1}}}, "'subset' must be a string"),
}


def assert_one_line_error(result, name, problem, table_printed=False):
    assert result.exit_code == 2, result.output
    assert result.stdout.startswith("subset ") if table_printed else result.stdout == ""
    message = result.stderr.rstrip("\n")
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith(f"error: {name}: ") and problem in message, message


def write_input(path, content):
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


BAD_FILES = ([("preds", case, *BAD_PREDICTIONS[case]) for case in BAD_PREDICTIONS] +
             [("gt", case, *BAD_GROUND_TRUTH[case]) for case in BAD_GROUND_TRUTH])


@pytest.mark.parametrize("which, case, content, problem", BAD_FILES,
                         ids=[f"{which}: {case}" for which, case, _, _ in BAD_FILES])
def test_bad_input_file(which, case, content, problem, tmp_path):
    files = {"gt": GOOD_GT, "preds": GOOD_PREDS, which: content}
    paths = {name: write_input(tmp_path / f"{name}.json", data) for name, data in files.items()}
    result = run_cli("evaluate", "--annotations", paths["gt"], "--preds", paths["preds"])
    assert_one_line_error(result, paths[which], problem)


@pytest.mark.parametrize("args, name, problem", [
    (["--subset", "validation"], "GT", "no video in subset 'validation' (subsets: test)"),
    (["--tiou", "0.5,x"], "--tiou", "is not a comma list of numbers"),
    (["--tiou", "0.3:0.7:0"], "--tiou", "needs a positive step"),
    (["--tiou", "0.5", "--dataset", "anet"], "--tiou", "give either --tiou or --dataset"),
])
def test_bad_options(args, name, problem, tmp_path):
    gt = write_input(tmp_path / "gt.json", GOOD_GT)
    preds = write_input(tmp_path / "preds.json", GOOD_PREDS)
    result = run_cli("evaluate", "--annotations", gt, "--preds", preds, *args)
    assert_one_line_error(result, gt if name == "GT" else name, problem)


def test_missing_file_and_directory(tmp_path):
    gt = write_input(tmp_path / "gt.json", GOOD_GT)
    missing = tmp_path / "nope.json"
    assert_one_line_error(run_cli("evaluate", "--annotations", gt, "--preds", missing), missing,
                          "no such file")
    assert_one_line_error(run_cli("evaluate", "--annotations", tmp_path, "--preds", gt), tmp_path,
                          "is a directory")


def test_outputs_that_cannot_be_written(files, tmp_path):
    gt, preds = files
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    result = run_cli("evaluate", "--annotations", gt, "--preds", preds, "--json", tmp_path)
    assert_one_line_error(result, tmp_path, "cannot write (Is a directory)", table_printed=True)
    result = run_cli("evaluate", "--annotations", gt, "--preds", preds, "--plot", a_file)
    assert_one_line_error(result, a_file, "is a file, expected a folder", table_printed=True)


def test_subprocess_error_is_one_line_with_exit_status_2(tmp_path):
    gt = write_input(tmp_path / "gt.json", GOOD_GT)
    preds = write_input(tmp_path / "preds.json", bad_detection(segment=[2, 1]))
    result = subprocess.run([sys.executable, "cli.py", "evaluate", "--annotations", gt, "--preds", preds],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr == (f"error: {preds}: video 'v1', detection 0: segment ends before it "
                             "starts (2.0 > 1.0)\n")


def test_existing_report_survives_a_failed_run(files, tmp_path):
    gt, _ = files
    out = tmp_path / "report.json"
    out.write_text('{"old": true}')
    bad = write_input(tmp_path / "bad.json", "{")
    assert run_cli("evaluate", "--annotations", gt, "--preds", bad, "--json", out).exit_code == 2
    assert json.loads(out.read_text()) == {"old": True}
