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
    result = CliRunner().invoke(cli.main, ["evaluate", "--annotations", str(path), "--preds", str(preds)])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning: ")]
    assert any(str(path) in line and "'video_7'" in line and "more than once" in line
               for line in warnings), result.output


# ---------------------------------------------------------------------------------------------
# Annotations that do not fit the store: training used to go on without a word.

def fitting_annotations(tmp_path):
    """A store of 4 training videos (6.5 s of features each) and annotations that fit it."""
    from helpers.training import synthetic_videos, write_store

    videos = synthetic_videos(4, "training", num_steps=48)
    store = write_store(tmp_path / "store.zarr", videos)
    database = {vid: {"subset": "training", "duration": float(v["times"][-1] + 0.3),
                      "annotations": v["annotations"]} for vid, v in videos.items()}
    return store, database


def mismatch_warnings(store, database, path):
    """The warning lines that opening the store's training set with these annotations gives."""
    import warnings

    from helpers.training import make_dataset

    path.write_text(json.dumps({"database": database}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_dataset(store, path)
    return [str(w.message) for w in caught if "features" in str(w.message)]


def test_annotations_scaled_by_an_fps_mix_up_are_one_warning_line_with_counts(tmp_path):
    """Every time doubled (annotated at half the frame rate): the durations disagree with the
    features in every video, and the segments beyond the features are counted; through
    ``train`` each is one ``warning:`` line."""
    from helpers.training import tiny_config, write_config

    store, database = fitting_annotations(tmp_path)
    assert mismatch_warnings(store, database, tmp_path / "fits.json") == []
    for video in database.values():
        video["duration"] *= 2
        for action in video["annotations"]:
            action["segment"] = [2 * t for t in action["segment"]]
    doubled = tmp_path / "doubled.json"
    duration, outside = mismatch_warnings(store, database, doubled)[::-1]
    assert duration.startswith(f"{doubled}: 4 of 4 'training' videos have an annotated duration "
                               "more than 15% off") and "median ratio 2.00" in duration
    assert outside.startswith(f"{doubled}: 4 of 12 'training' segments, in 4 of 4 videos, lie "
                              "outside their video's features"), outside

    config = write_config(tmp_path / "config.json", tiny_config(
        train={"epochs": 1}, head={"max_seq_len": 48}))
    result = CliRunner().invoke(cli.main, [
        "train", "--config", str(config), "--store", str(store), "--annotations", str(doubled),
        "--out", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if "features" in line]
    assert lines == [f"warning: {outside}", f"warning: {duration}"], result.stderr


def test_segments_beyond_the_features_are_counted_in_one_warning(tmp_path):
    store, database = fitting_annotations(tmp_path)
    for vid in ("video_001", "video_003"):
        duration = database[vid]["duration"]
        database[vid]["annotations"].append({"segment": [duration + 5, duration + 8],
                                             "label": "Run"})
    path = tmp_path / "beyond.json"
    assert mismatch_warnings(store, database, path) == [
        f"{path}: 2 of 14 'training' segments, in 2 of 4 videos, lie outside their video's "
        "features and are not trained on (e.g. 1 in 'video_001', whose features end at 6.53 s);"
        " are these the store's annotations?"]
