"""Annotation files that are valid JSON but hostile in shape: one video with 20,000 segments
(duplicate cleaning was quadratic: 134 s), and a video id given twice (the last one won
without a word)."""
import json
import time

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from evaluation import load_annotations
from evaluation.annotations import DUPLICATE_TOLERANCE_SECONDS, clean_ground_truth


def cleaned_by_definition(segments, labels):
    """The definition, compared with every kept segment (quadratic): a same-label segment
    within the tolerance at both ends of a kept one is a duplicate."""
    kept = []
    for (start, end), label in zip(segments, labels):
        if not any(label == other and abs(start - s) <= DUPLICATE_TOLERANCE_SECONDS
                   and abs(end - e) <= DUPLICATE_TOLERANCE_SECONDS for (s, e), other in kept):
            kept.append(((start, end), label))
    return kept


def near_duplicates(count, seed):
    """Segments on a coarse grid jittered by up to 2x the tolerance: many exact and near
    duplicates, some just outside the tolerance, a few labels."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, count // 4, count) * 0.01 + rng.uniform(-2, 2, count) * 1e-3
    ends = starts + 1.0 + rng.integers(0, 3, count) * 0.01 + rng.uniform(-2, 2, count) * 1e-3
    labels = [f"class{k}" for k in rng.integers(0, 3, count)]
    return [(float(s), float(e)) for s, e in zip(starts, ends)], labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_duplicate_cleaning_equals_its_definition(seed):
    segments, labels = near_duplicates(3000, seed)
    array, kept_labels, counts = clean_ground_truth(segments, labels)
    expected = cleaned_by_definition(segments, labels)
    assert [((s, e), label) for (s, e), label in zip(array.tolist(), kept_labels)] == expected
    assert counts.duplicate == len(segments) - len(expected) > 100


def test_twenty_thousand_segments_of_one_video_are_cleaned_in_linear_time(tmp_path):
    segments, labels = near_duplicates(20_000, 3)
    gt = {"database": {"long": {"subset": "test", "duration": 1e4, "annotations": [
        {"segment": list(segment), "label": label} for segment, label in zip(segments, labels)]}}}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    started = time.perf_counter()
    annotations = load_annotations(str(path))
    assert time.perf_counter() - started < 10  # 134 s when quadratic
    assert 0 < len(annotations.video("long").labels) < 20_000


def test_a_video_id_given_twice_is_a_warning_naming_it(tmp_path):
    entry = '{"subset": "test", "duration": 10.0, "annotations": [%s]}'
    segment = '{"segment": [%d, %d.5], "label": "Jump"}'
    path = tmp_path / "gt.json"
    path.write_text('{"database": {"video_7": %s, "video_8": %s, "video_7": %s}}' % (
        entry % ", ".join(segment % (i, i) for i in range(3)), entry % (segment % (1, 1)),
        entry % (segment % (4, 4))))
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps({"results": {}}))
    result = CliRunner().invoke(cli.main, ["evaluate", "--gt", str(path), "--preds", str(preds)])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning: ")]
    assert any(str(path) in line and "'video_7'" in line and "more than once" in line
               for line in warnings), result.output
