"""mAP evaluator: hand-computed cases, equivalence with the reference evaluator, real THUMOS files."""
import json
import random
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evaluation import (EvaluationWarning, evaluate_detections, evaluate_map, load_annotations,
                        load_predictions, parse_tiou)
from evaluation import matching
from evaluation.commands import EVALUATE_FLAGS
from evaluation.metrics import rank_order
from helpers.evaluation_inputs import (ACTIONFORMER_FILE, OPENTAD_FILE, gt_dict, needs_thumos,
                                       preds_dict)
from helpers.reference_map import reference_map
from losa_tal import InputError, flag_errors


def class_ap(gt, preds, label, thresholds=(0.5,)):
    return evaluate_map(load_annotations(gt), load_predictions(preds), "test",
                        list(thresholds))["per_class_AP"][label]


# -- hand-computed cases -----------------------------------------------------------------------
def test_perfect_predictions_score_one_at_every_threshold():
    gt = gt_dict({"v1": [(0, 10, "A"), (20, 25, "B")], "v2": [(3, 4, "A")]})
    preds = preds_dict({"v1": [(0, 10, "A", 0.9), (20, 25, "B", 0.8)], "v2": [(3, 4, "A", 0.7)]})
    report = evaluate_map(gt, preds, tiou_thresholds=parse_tiou(dataset="anet"))
    assert report["mAP"] == [1.0] * 10 and report["average_mAP"] == 1.0


def test_false_positive_ranked_first_halves_ap():
    gt = gt_dict({"v1": [(0, 10, "A")]})
    # ranks: FP, TP -> precision 0, 1/2 at recall 0, 1 -> envelope 1/2
    assert class_ap(gt, preds_dict({"v1": [(20, 30, "A", 0.9), (0, 10, "A", 0.8)]}), "A") == [0.5]


def test_taken_best_ground_truth_falls_back_to_the_next_one():
    gt = gt_dict({"v1": [(0, 10, "A"), (4, 14, "A")]})
    # the second detection's best match (tIoU 9/11) is taken; its next best has tIoU 7/13
    preds = preds_dict({"v1": [(0, 10, "A", 0.9), (1, 11, "A", 0.8)]})
    assert class_ap(gt, preds, "A", [0.5, 0.6]) == [1.0, 0.5]


def test_ties_in_tiou_go_to_the_ground_truth_listed_later():
    gt = gt_dict({"v1": [(0, 10, "A"), (10, 20, "A")]})
    # (5, 15) overlaps both equally; like the peers it takes the later one, (10, 20), which then
    # counts as a duplicate
    preds = preds_dict({"v1": [(5, 15, "A", 0.9), (0, 10, "A", 0.8), (10, 20, "A", 0.7)]})
    evaluation = evaluate_detections(gt, preds, tiou_thresholds=[0.3])
    assert evaluation.matched.tolist() == [[1, 0, -1]]


def test_both_peer_rules_at_once_give_the_peers_numbers():
    """Worked out by hand with the procedure of ActivityNet's eval_detection.py, ActionFormer's
    libs/utils/metrics.py and OpenTAD's evaluator (distinct scores, no duplicates: all agree)."""
    gt = gt_dict({"v1": [(0, 10, "A"), (10, 20, "A")]})
    gt["database"]["t1"] = {"subset": "train", "annotations": [{"segment": [0, 10], "label": "A"}]}
    preds = preds_dict({"v1": [(5, 15, "A", 0.9), (10, 20, "A", 0.8), (0, 10, "A", 0.7)],
                        "t1": [(0, 10, "A", 0.85)], "ghost": [(0, 10, "A", 0.75)]})
    # ranks 0.9 0.85 0.8 0.75 0.7. At 0.3: (5, 15) ties 1/3 with both, takes (10, 20); t1 and
    # ghost are false positives (no ground truth of theirs in 'test'); (10, 20) finds its match
    # taken; (0, 10) matches. Hits 1 0 0 0 1: AP = 1/2 * 1 + 1/2 * 2/5 = 0.7.
    # At 0.5: (5, 15) misses; hits 0 0 1 0 1, envelope 2/5 throughout: AP = 0.4.
    with pytest.warns(EvaluationWarning, match="2 detections on 2 videos outside subset 'test' "
                      "count as false positives"):
        report = evaluate_map(gt, preds, "test", [0.3, 0.5])
    np.testing.assert_allclose(report["mAP"], [0.7, 0.4], rtol=0, atol=1e-15)
    # The old rule, kept as an option: other videos dropped. Hits 1 0 1 at 0.3, 0 1 1 at 0.5.
    with pytest.warns(EvaluationWarning, match="2 detections on 2 videos outside .* are ignored"):
        report = evaluate_map(gt, preds, "test", [0.3, 0.5], ignore_other_videos=True)
    np.testing.assert_allclose(report["mAP"], [0.5 + 1 / 3, 0.5 * 2 / 3 + 0.5 * 2 / 3],
                               rtol=0, atol=1e-15)


def test_tiou_exactly_at_threshold_matches():
    gt = gt_dict({"v1": [(0, 10, "A")]})
    assert class_ap(gt, preds_dict({"v1": [(0, 5, "A", 1.0)]}), "A", [0.5, 0.50001]) == [1.0, 0.0]


@pytest.mark.parametrize("pred, truth, threshold, hit", [
    # inter / (len_pred + len_gt - inter) gives exactly 0.6; inter / (max end - min start) less
    ((9.9, 16.2), (9.3, 19.8), 0.6, True),
    # ... and here 0.49999999999999994 where the other formula gives 0.5
    ((4.1, 9.5), (6.7, 9.4), 0.5, False),
])
def test_tiou_formula_is_the_one_the_field_uses_to_the_last_bit(pred, truth, threshold, hit):
    gt = gt_dict({"v1": [(*truth, "A")]})
    ap = class_ap(gt, preds_dict({"v1": [(*pred, "A", 1.0)]}), "A", [threshold])
    assert ap == [1.0 if hit else 0.0]


def test_duplicate_detection_is_a_false_positive():
    gt = gt_dict({"v1": [(0, 10, "A"), (20, 30, "A")]})
    preds = preds_dict({"v1": [(0, 10, "A", 0.9), (0, 10, "A", 0.8), (20, 30, "A", 0.7)]})
    # hits 1, 0, 1: 1/2 * 1 + 1/2 * 2/3
    assert class_ap(gt, preds, "A") == pytest.approx([0.5 + 1 / 3], abs=1e-15)


@pytest.mark.parametrize("order, expected", [(("miss", "hit"), 0.5), (("hit", "miss"), 1.0)])
def test_equal_scores_keep_file_order(order, expected):
    gt = gt_dict({"v1": [(0, 10, "A")]})
    rows = {"hit": (0, 10, "A", 0.5), "miss": (50, 60, "A", 0.5)}
    assert class_ap(gt, preds_dict({"v1": [rows[name] for name in order]}), "A") == [expected]


@pytest.mark.parametrize("video_order, expected", [(("v2", "v1"), 0.25), (("v1", "v2"), 0.5)])
def test_equal_scores_across_videos_keep_the_order_of_videos_in_the_file(video_order, expected):
    gt = gt_dict({"v1": [(0, 10, "A")], "v2": [(0, 10, "A")]})
    detections = {"v2": [(50, 60, "A", 0.5)], "v1": [(0, 10, "A", 0.5)]}
    preds = preds_dict({vid: detections[vid] for vid in video_order})
    assert class_ap(gt, preds, "A") == [expected]  # a miss then a hit of 2: 1/2 * 1/2


def test_recall_counts_all_ground_truth_and_missing_classes_score_zero():
    gt = gt_dict({"v1": [(0, 10, "A"), (20, 30, "A"), (40, 50, "B")]})
    report = evaluate_map(gt, preds_dict({"v1": [(0, 10, "A", 0.9)]}), tiou_thresholds=[0.5])
    assert report["per_class_AP"] == {"A": [0.5], "B": [0.0]}
    assert report["mAP"] == [0.25] and report["num_gt"] == {"A": 2, "B": 1}


def test_detection_on_a_video_without_that_class_is_a_false_positive():
    gt = gt_dict({"v1": [(0, 10, "A")], "v2": [(0, 10, "B")]})
    preds = preds_dict({"v2": [(0, 10, "A", 0.9)], "v1": [(0, 10, "A", 0.8)]})
    assert class_ap(gt, preds, "A") == [0.5]


def test_nothing_is_truncated_per_video():
    gt = gt_dict({"v1": [(0, 10, "A")]})
    misses = [(100 + i, 101 + i, "A", 0.9) for i in range(2500)]
    assert class_ap(gt, preds_dict({"v1": misses + [(0, 10, "A", 0.1)]}), "A") == [1 / 2501]


def test_labels_without_ground_truth_are_ignored_with_a_warning_naming_them():
    gt = gt_dict({"v1": [(0, 10, "A")]})
    preds = preds_dict({"v1": [(0, 10, "Zebra", 1.0), (0, 10, "A", 0.5), (0, 1, "Yak", 0.7)]})
    with pytest.warns(EvaluationWarning, match="2 detections of labels .*: Yak, Zebra"):
        report = evaluate_map(gt, preds, tiou_thresholds=[0.5])
    assert report["per_class_AP"] == {"A": [1.0]} and report["num_detections"] == 1


def test_detections_outside_the_subset_are_false_positives_unless_ignored():
    gt = gt_dict({"v1": [(0, 10, "A")]})
    gt["database"]["t1"] = {"subset": "train", "annotations": [{"segment": [0, 10], "label": "A"}]}
    preds = preds_dict({"t1": [(0, 10, "A", 1.0), (0, 10, "Zebra", 1.0)],
                        "v1": [(0, 10, "A", 0.5)]})
    with pytest.warns(EvaluationWarning) as caught:
        report = evaluate_map(gt, preds, tiou_thresholds=[0.5])
    assert report["mAP"] == [0.5] and report["num_detections"] == 2
    assert [str(w.message) for w in caught] == [
        "<predictions>: 1 detections on 1 videos outside subset 'test' count as false positives",
        "<predictions>: ignored 1 detections of labels without ground truth in subset 'test': "
        "Zebra"]
    with pytest.warns(EvaluationWarning, match="^<predictions>: 2 detections on 1 videos "
                      "outside subset 'test' are ignored$"):
        report = evaluate_map(gt, preds, tiou_thresholds=[0.5], ignore_other_videos=True)
    assert report["mAP"] == [1.0] and report["num_detections"] == 1


def test_predictions_for_none_of_the_subset_videos_are_an_error():
    gt = gt_dict({"v1": [(0, 10, "A")]})
    with pytest.raises(InputError, match="<predictions>: none of its 1 videos is in subset 'test'"):
        evaluate_map(gt, preds_dict({"video_1.mp4": [(0, 10, "A", 1.0)]}))


def test_empty_predictions_score_zero():
    gt = gt_dict({"v1": [(0, 10, "A")]})
    assert evaluate_map(gt, {"results": {}}, tiou_thresholds=[0.5])["mAP"] == [0.0]


def test_ground_truth_cleaning_drops_short_segments_and_same_label_duplicates():
    gt = gt_dict({"v1": [(0, 10, "A"), (0.0005, 10.0009, "A"), (0, 10, "B"), (5, 5.0005, "A"),
                         (3, 4, "Ambiguous"), (0.002, 10, "A")]})
    ann = load_annotations(gt)
    video = ann.videos("test")["v1"]
    assert video.labels == ["A", "B", "A"]
    assert video.segments.tolist() == [[0, 10], [0, 10], [0.002, 10]]
    assert ann.cleaning(["v1"]).as_dict() == {"too_short": 1, "duplicate": 1, "ambiguous": 1}
    assert ann.classes == ["A", "B"]
    report = evaluate_map(ann, preds_dict({"v1": [(0, 10, "A", 1.0)]}), tiou_thresholds=[0.5])
    assert report["gt_dropped"] == {"too_short": 1, "duplicate": 1, "ambiguous": 1}
    assert report["num_gt"] == {"A": 2, "B": 1}


# -- subsets -------------------------------------------------------------------------------------
@pytest.mark.parametrize("subsets, test, train", [
    (["Validation", "Test"], "Test", "Validation"),  # ActionFormer
    (["training", "validation"], "validation", "training"),  # OpenTAD
    (["training", "validation", "testing"], "validation", "training"),  # ActivityNet
    (["train", "val"], "val", "train"),
    (["only"], "only", None),
    (["a", "b"], None, None),
])
def test_test_and_train_subsets_follow_the_naming_conventions(subsets, test, train):
    gt = {"database": {f"v{i}": {"subset": name, "annotations": [{"segment": [0, 1], "label": "A"}]}
                       for i, name in enumerate(subsets)}}
    ann = load_annotations(gt)
    assert (ann.test_subset, ann.train_subset) == (test, train)


def test_subset_names_match_case_insensitively_and_unknown_ones_list_what_exists():
    gt = gt_dict({"v1": [(0, 10, "A")]}, subset="Test")
    ann = load_annotations(gt)
    assert list(ann.videos("TEST")) == ["v1"] and ann.resolve_subset("test") == "Test"
    with pytest.raises(InputError, match=r"no video in subset 'validation' \(subsets: Test\)"):
        ann.videos("validation")


def test_subset_without_ground_truth_is_an_error_not_a_nan():
    gt = gt_dict({"v1": [(0, 10, "A")]}, subset="validation")
    gt["database"]["t1"] = {"subset": "testing", "annotations": []}
    with pytest.raises(InputError, match="subset 'testing' has no ground-truth segments"):
        evaluate_map(gt, preds_dict({"t1": [(0, 1, "A", 1.0)]}), subset="testing")


def test_select_relabels_as_parsing_the_relabelled_file_would():
    """Training scores a class-agnostic head on the selected videos, every label one class: the
    same ground truth (and cleaning) as writing that file and parsing it."""
    gt = gt_dict({"v1": [(0, 10, "A"), (0, 10, "B"), (20, 25, "B"), (20, 25, "B")],
                  "v2": [(3, 4, "A")], "v3": [(5, 6, "B")]})
    picked = load_annotations(gt).select(["v3", "v1"], relabel=lambda label: "action")
    by_file = load_annotations(gt_dict({"v3": [(5, 6, "action")],
                                        "v1": [(0, 10, "action"), (20, 25, "action")]}))
    assert list(picked.videos("test")) == ["v3", "v1"] and picked.classes == ["action"]
    for vid in ("v1", "v3"):
        assert picked.video(vid).segments.tolist() == by_file.video(vid).segments.tolist()
        assert picked.video(vid).labels == by_file.video(vid).labels
    # one duplicate dropped on loading (20-25 B twice), one more by the relabelling (0-10)
    assert picked.cleaning(["v1"]).duplicate == 2
    assert load_annotations(gt).select(["v2"]).video("v2").labels == ["A"]


def test_ambiguous_default_subset_asks_for_one():
    gt = {"database": {"a": {"subset": "x", "annotations": []}, "b": {"subset": "y"}}}
    with pytest.raises(InputError, match=r"choose one with --subset \(subsets: x, y\)"), \
            flag_errors(EVALUATE_FLAGS):
        load_annotations(gt).videos()


# -- thresholds ----------------------------------------------------------------------------------
def test_tiou_specs_parse_exactly():
    assert parse_tiou("0.3,0.5,0.8999999999999999") == [0.3, 0.5, 0.8999999999999999]
    assert parse_tiou(dataset="anet") == np.linspace(0.5, 0.95, 10).tolist()
    assert parse_tiou(dataset="thumos") == np.linspace(0.3, 0.7, 5).tolist() == parse_tiou()
    assert parse_tiou("0.5:0.95:0.05") == parse_tiou(dataset="anet")
    assert parse_tiou("0.5:0.5:0.1") == [0.5]


@pytest.mark.parametrize("spec", ["0.3,abc", "", "0:1:0", "0.7:0.3:0.1", "0.3:0.7:0.15", "1.5",
                                  "0", "nan", "0.1:0.2"])
def test_bad_tiou_specs_are_input_errors(spec):
    with pytest.raises(InputError, match="^--tiou: "), flag_errors(EVALUATE_FLAGS):
        parse_tiou(spec)


# -- equivalence with the straightforward reference ----------------------------------------------
LABELS = ["a", "b", "c"]
segment = st.tuples(st.integers(0, 24), st.integers(0, 10)).map(lambda p: (p[0] / 2, (p[0] + p[1]) / 2))
gt_segment = st.tuples(st.integers(0, 24), st.integers(1, 10)).map(
    lambda p: (p[0] / 2, (p[0] + p[1]) / 2))
scores = st.sampled_from([0.1, 0.2, 0.3, 0.5, 0.8, 1.0])  # few values: many ties
videos = ["v1", "v2", "v3"]


@st.composite
def evaluation_inputs(draw, unique_scores=False):
    truth = {vid: [(*draw(gt_segment), draw(st.sampled_from(LABELS)))
                   for _ in range(draw(st.integers(0, 5)))] for vid in videos}
    truth["v1"].append((*draw(gt_segment), "a"))  # at least one segment in the subset
    gt = gt_dict(truth)
    gt["database"]["other"] = {"subset": "train",
                               "annotations": [{"segment": [0, 5], "label": "a"}]}
    detections = {vid: [(*draw(segment), draw(st.sampled_from(LABELS + ["zz"]))) +
                        (draw(scores),) for _ in range(draw(st.integers(0, 12)))]
                  for vid in videos + ["other", "ghost"]}
    if unique_scores:
        ranks = iter(random.Random(draw(st.integers(0, 99))).sample(range(1000), 1000))
        detections = {vid: [d[:3] + (next(ranks) / 1000,) for d in dets]
                      for vid, dets in detections.items()}
    thresholds = draw(st.lists(st.sampled_from([0.1, 0.25, 0.3, 0.5, 0.6, 0.7, 1.0]), min_size=1,
                               max_size=4))
    return gt, preds_dict(detections), thresholds


def quiet_map(gt, preds, thresholds, ignore_other_videos=False):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EvaluationWarning)
        return evaluate_map(gt, preds, "test", thresholds, ignore_other_videos)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(evaluation_inputs(), st.booleans())
def test_vectorised_evaluator_equals_the_reference(inputs, ignore_other_videos):
    gt, preds, thresholds = inputs
    report = quiet_map(gt, preds, thresholds, ignore_other_videos)
    expected = reference_map(gt, preds, "test", thresholds, ignore_other_videos)
    assert report["per_class_AP"].keys() == expected["per_class_AP"].keys()
    for label, ap in expected["per_class_AP"].items():
        np.testing.assert_allclose(report["per_class_AP"][label], ap, rtol=0, atol=1e-12)
    np.testing.assert_allclose(report["mAP"], expected["mAP"], rtol=0, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(evaluation_inputs(unique_scores=True), st.randoms(use_true_random=False))
def test_result_does_not_depend_on_the_order_of_videos(inputs, rng):
    gt, preds, thresholds = inputs
    shuffled_gt = {"database": dict(rng.sample(list(gt["database"].items()), len(gt["database"])))}
    shuffled_preds = {"results": dict(rng.sample(list(preds["results"].items()),
                                                 len(preds["results"])))}
    assert quiet_map(shuffled_gt, shuffled_preds, thresholds) == quiet_map(gt, preds, thresholds)


@pytest.mark.parametrize("pairs_per_chunk", [matching.PAIRS_PER_CHUNK, 50, 1])
def test_crowded_overlapping_ground_truth_equals_the_reference(pairs_per_chunk, monkeypatch):
    # Many same-class segments overlapping each other: long chains of fallbacks to resolve,
    # whether the candidate pairs are built at once or a few (or one detection's) at a time.
    monkeypatch.setattr(matching, "PAIRS_PER_CHUNK", pairs_per_chunk)
    rng = np.random.default_rng(7)
    starts = rng.uniform(0, 40, 60)
    truth = {"v1": [(s, s + rng.uniform(1, 8), str(rng.choice(["a", "b"]))) for s in starts]}
    starts = rng.uniform(0, 40, 1500)
    detections = {"v1": [(s, s + rng.uniform(0.5, 8), str(rng.choice(["a", "b"])),
                          float(rng.choice([0.2, 0.4, 0.6, 0.8]))) for s in starts]}
    gt, preds = gt_dict(truth), preds_dict(detections)
    thresholds = parse_tiou(dataset="anet") + [0.1, 0.3]
    report = evaluate_map(gt, preds, "test", thresholds)
    expected = reference_map(gt, preds, "test", thresholds)
    np.testing.assert_allclose(report["mAP"], expected["mAP"], rtol=0, atol=1e-12)


@pytest.mark.slow
def test_many_detections_against_many_segments_of_one_class_stay_in_bounded_memory():
    # 100,000 detections and 2,000 segments of one class in one video: 200 million candidate
    # pairs, which took over 11 GB when built at once.
    from helpers.memory import peak_growth

    growth = peak_growth("""
        import numpy as np
        from evaluation import evaluate_map
        from helpers.evaluation_inputs import gt_dict, preds_dict
        rng = np.random.default_rng(0)
        starts = np.sort(rng.uniform(0, 20_000, 2_000))
        gt = gt_dict({"v": [(s, s + 5, "a") for s in starts]}, duration=20_010)
        starts = rng.uniform(0, 20_000, 100_000)
        preds = preds_dict({"v": [(s, s + rng.uniform(1, 10), "a", float(p))
                                  for s, p in zip(starts, rng.uniform(size=100_000))]})
        """, """
        report = evaluate_map(gt, preds, "test")
        assert 0.05 < report["average_mAP"] < 1
        """)
    assert growth < 600 * 2**20, growth / 2**20


def test_rank_order_is_a_stable_sort_by_label_then_descending_score():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(5000), 2)
    scores[::7] = 0.0
    scores[1::7] = -0.0
    labels = rng.integers(0, 300, 5000)  # 16-bit labels
    expected = np.lexsort((np.arange(5000), -scores, labels))
    assert np.array_equal(rank_order(labels, scores, 300), expected)


# -- real THUMOS-14 annotation files -------------------------------------------------------------
def raw(path):
    with open(path) as file:
        return json.load(file)


@pytest.mark.parametrize("path, test, train, num_test, fps", [
    (ACTIONFORMER_FILE, "Test", "Validation", 212, 30.0),
    (OPENTAD_FILE, "validation", "training", 211, None),
])
@needs_thumos
def test_real_thumos_files_parse_in_both_layouts(path, test, train, num_test, fps):
    ann = load_annotations(path)
    data = raw(path)["database"]
    assert len(ann.classes) == 20 and "Ambiguous" not in ann.classes
    assert ann.classes == sorted({a["label"] for v in data.values() for a in v["annotations"]})
    assert (ann.test_subset, ann.train_subset) == (test, train)
    assert len(ann.videos()) == num_test and len(ann.videos(train.upper())) == 200
    kept = sum(len(v.labels) for s in ann.subsets for v in ann.videos(s).values())
    dropped = ann.cleaning(list(data))
    total = sum(len(v["annotations"]) for v in data.values())
    assert kept + dropped.too_short + dropped.duplicate + dropped.ambiguous == total
    vid = next(iter(ann.videos()))
    video = ann.videos()[vid]
    assert video.fps == fps and video.duration == data[vid]["duration"]
    assert video.num_frames == data[vid].get("frame")
    assert video.segments.dtype == np.float64 and video.segments.shape == (len(video.labels), 2)
    # identical segments with different labels (CricketBowling/CricketShot) are all kept
    pairs = [(vid, tuple(s), label) for vid, v in ann.videos().items()
             for s, label in zip(v.segments, v.labels)]
    assert len(set(pairs)) == len(pairs) > len({p[:2] for p in pairs})


@needs_thumos
def test_a_duplicate_injected_into_real_thumos_is_cleaned():
    data = raw(OPENTAD_FILE)
    vid = next(iter(data["database"]))
    first = data["database"][vid]["annotations"][0]
    s, e = first["segment"]
    data["database"][vid]["annotations"] += [
        {"segment": [s + 0.0005, e - 0.0005], "label": first["label"]},  # duplicate
        {"segment": [s + 0.01, e], "label": first["label"]},  # a different segment
    ]
    before = load_annotations(OPENTAD_FILE).cleaning([vid])
    after = load_annotations(data)
    assert after.cleaning([vid]).duplicate == before.duplicate + 1
    assert len(after.video(vid).labels) == len(load_annotations(OPENTAD_FILE).video(vid).labels) + 1


@needs_thumos
def test_thumos_detections_from_one_layout_scored_against_the_other():
    actionformer = load_annotations(ACTIONFORMER_FILE)
    opentad = load_annotations(OPENTAD_FILE)
    detections = {vid: [(*s, label, 1.0) for s, label in zip(v.segments, v.labels)]
                  for vid, v in actionformer.videos().items()}
    # OpenTAD's file lacks video_test_0000270: leave its detections out of the comparison
    with pytest.warns(EvaluationWarning, match="on 1 videos outside subset 'validation' are ign"):
        report = evaluate_map(opentad, preds_dict(detections), tiou_thresholds=[0.5],
                              ignore_other_videos=True)

    def segments_per_class(ann):
        return {c: sorted((vid, tuple(s)) for vid, v in ann.videos().items()
                          for s, label in zip(v.segments, v.labels)
                          if label == c and vid in opentad.videos())
                for c in ann.classes}

    same = segments_per_class(actionformer)
    other = segments_per_class(opentad)
    for label, ap in report["per_class_AP"].items():
        assert (ap == [1.0]) == (same[label] == other[label]), label
    assert report["mAP"][0] < 1.0
