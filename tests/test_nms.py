"""NMS and Soft-NMS of head/nms.py against a straightforward per-detection reference."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from head.nms import batched_nms, segment_iou, segment_voting


def reference_iou(a, b, length_offset=1e-6):
    """ActionFormer's NMS extension: each segment's length counts 1e-6 more."""
    intersection = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = (a[1] - a[0] + length_offset) + (b[1] - b[0] + length_offset) - intersection
    return intersection / max(union, 1e-12)


def reference_weight(iou, method, iou_threshold, sigma):
    if method == "soft":
        return math.exp(-iou * iou / sigma)
    if method == "linear":
        return 1 - iou if iou >= iou_threshold else 1.0
    return 0.0 if iou >= iou_threshold else 1.0


def reference_nms(detections, nms_method, iou_threshold, sigma, min_score, max_segments):
    """One detection at a time, one class at a time, in plain Python.

    detections: list of (start, end, score, label). Returns the same tuples, best first.
    """
    kept = []
    for label in sorted({d[3] for d in detections}):
        live = [[d[0], d[1], d[2]] for d in detections if d[3] == label and d[2] >= min_score]
        picked = 0
        while live and picked < max_segments:
            best = max(range(len(live)), key=lambda i: (live[i][2], -i))  # first of the best
            start, end, score = live.pop(best)
            kept.append((start, end, score, label))
            picked += 1
            survivors = []
            for other in live:
                weight = reference_weight(reference_iou((start, end), other), nms_method,
                                          iou_threshold, sigma)
                other[2] *= weight
                if weight > 0 and other[2] >= min_score:
                    survivors.append(other)
            live = survivors
    kept.sort(key=lambda d: -d[2])  # stable: class, then keep order, on equal scores
    return kept[:max_segments]


def run_nms(detections, **options):
    tensor = torch.tensor(detections, dtype=torch.float64).reshape(-1, 4)
    segments, scores, labels = batched_nms(tensor[:, :2], tensor[:, 2], tensor[:, 3].long(),
                                           **options)
    return [(s[0], s[1], c, int(lab)) for s, c, lab in
            zip(segments.tolist(), scores.tolist(), labels.tolist())]


def assert_same_detections(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g[3] == e[3]
        assert g[:3] == pytest.approx(e[:3], rel=1e-9, abs=1e-12)


# Coarse values make exact duplicates, shared boundaries and tied scores likely.
coordinate = st.integers(0, 40).map(lambda v: v / 2)
detection = st.tuples(coordinate, st.integers(1, 20).map(lambda v: v / 2),
                      st.one_of(st.sampled_from([0.9, 0.5, 0.0005]), st.floats(0.0, 1.0)),
                      st.integers(0, 3)).map(lambda d: (d[0], d[0] + d[1], d[2], d[3]))


@settings(max_examples=150, deadline=None)
@given(detections=st.lists(detection, max_size=30), method=st.sampled_from(["soft", "linear", "hard"]),
       iou_threshold=st.sampled_from([0.1, 0.5, 0.7]), max_segments=st.integers(1, 40))
def test_nms_equals_reference(detections, method, iou_threshold, max_segments):
    options = dict(nms_method=method, iou_threshold=iou_threshold, sigma=0.5, min_score=0.001,
                   max_segments=max_segments)
    assert_same_detections(run_nms(detections, **options),
                           reference_nms(detections, **options))


def test_gaussian_soft_nms_decays_by_hand_computed_weight():
    # IoU([0, 4], [2, 6]) = 2 / 6; the second keeps exp(-(1/3)**2 / 0.5) of its score.
    got = run_nms([(0, 4, 0.9, 0), (2, 6, 0.8, 0), (2, 6, 0.7, 1)], nms_method="soft", sigma=0.5)
    assert got[0] == (0, 4, pytest.approx(0.9), 0)
    assert got[1] == (2, 6, pytest.approx(0.7), 1)      # another class: untouched
    assert got[2] == (2, 6, pytest.approx(0.8 * math.exp(-1 / 9 / 0.5)), 0)


def test_hard_nms_removes_overlaps_above_threshold_only():
    detections = [(0, 10, 0.9, 0), (1, 10, 0.8, 0), (8, 18, 0.7, 0)]   # IoUs 0.9 and 2/18
    got = run_nms(detections, nms_method="hard", iou_threshold=0.5)
    assert [d[:3] for d in got] == [(0, 10, pytest.approx(0.9)), (8, 18, pytest.approx(0.7))]


def test_segment_iou_values():
    one = torch.tensor([0.0, 4.0])
    many = torch.tensor([[0.0, 4.0], [2.0, 6.0], [4.0, 8.0], [1.0, 2.0]])
    assert segment_iou(one, many).tolist() == pytest.approx([1.0, 1 / 3, 0.0, 0.25])


def test_voting_averages_same_class_overlaps_by_score_times_iou():
    kept = torch.tensor([[0.0, 10.0]])
    candidates = torch.tensor([[0.0, 10.0], [1.0, 11.0], [0.0, 30.0], [1.0, 11.0]])
    scores = torch.tensor([0.6, 0.2, 0.9, 0.9])
    labels = torch.tensor([0, 0, 0, 1])    # the third overlaps too little, the fourth is class 1
    voted = segment_voting(kept, torch.tensor([0]), candidates, scores, labels, 0.7)
    w_self, w_shifted = 0.6 * 1.0, 0.2 * 9 / 11     # score x IoU with [0, 10]
    expected_start = (w_self * 0 + w_shifted * 1) / (w_self + w_shifted)
    assert voted.tolist() == [[pytest.approx(expected_start), pytest.approx(expected_start + 10)]]


def test_voting_in_chunks_equals_voting_at_once():
    generator = torch.Generator().manual_seed(0)
    starts = torch.rand(200, generator=generator) * 100
    segments = torch.stack([starts, starts + 1 + torch.rand(200, generator=generator) * 20], 1)
    scores = torch.rand(200, generator=generator)
    labels = torch.randint(0, 3, (200,), generator=generator)
    kept, _, kept_labels = batched_nms(segments, scores, labels, nms_method="hard", iou_threshold=0.3)
    at_once = segment_voting(kept, kept_labels, segments, scores, labels, 0.5, chunk=10_000)
    chunked = segment_voting(kept, kept_labels, segments, scores, labels, 0.5, chunk=7)
    assert kept.shape[0] > 7 and not torch.equal(at_once, kept)
    assert torch.allclose(at_once, chunked)
