"""A straightforward, per-detection mAP evaluator: the specification the fast one is tested against.

It follows the ActivityNet procedure literally (loops over detections, thresholds and candidate
ground truth), shares no code with ``evaluation/``, and is slow on purpose of being obvious.
``bench/eval_speed.py`` times it too.
"""
import math

MIN_SEGMENT = 1e-3
DUPLICATE_TOLERANCE = 1e-3


def reference_map(gt_json: dict, pred_json: dict, subset: str, thresholds,
                  ignore_other_videos=False) -> dict:
    """``{"per_class_AP": {label: [AP per threshold]}, "mAP": [...]}`` for raw JSON dicts.

    Detections on videos outside the subset are false positives (they have no ground truth),
    unless ``ignore_other_videos`` drops them.
    """
    gt_by_class = _ground_truth_by_class(gt_json, subset)
    videos_in_subset = {vid for vid, entry in gt_json["database"].items()
                        if entry.get("subset", "").lower() == subset.lower()}
    detections = [(vid, d["label"], float(d["segment"][0]), float(d["segment"][1]),
                   float(d["score"]))
                  for vid, items in pred_json["results"].items()
                  if vid in videos_in_subset or not ignore_other_videos
                  for d in items]
    per_class = {}
    for label in sorted(gt_by_class):
        ground_truth = gt_by_class[label]
        mine = [d for d in detections if d[1] == label]
        mine.sort(key=lambda d: -d[4])  # Python's sort is stable: ties keep file order
        per_class[label] = [_class_ap(ground_truth, mine, t) for t in thresholds]
    mean = [sum(ap[i] for ap in per_class.values()) / len(per_class)
            for i in range(len(thresholds))]
    return {"per_class_AP": per_class, "mAP": mean}


def _ground_truth_by_class(gt_json, subset):
    """{label: {video: [(start, end), ...]}} after dropping Ambiguous, short and duplicates."""
    by_class = {}
    for vid, entry in gt_json["database"].items():
        if entry.get("subset", "").lower() != subset.lower():
            continue
        kept = []
        for item in entry.get("annotations", []):
            start, end = float(item["segment"][0]), float(item["segment"][1])
            label = item["label"]
            if label == "Ambiguous" or end - start < MIN_SEGMENT:
                continue
            if any(k_label == label and abs(start - k_start) <= DUPLICATE_TOLERANCE
                   and abs(end - k_end) <= DUPLICATE_TOLERANCE
                   for k_start, k_end, k_label in kept):
                continue
            kept.append((start, end, label))
        for start, end, label in kept:
            by_class.setdefault(label, {}).setdefault(vid, []).append((start, end))
    return by_class


def tiou(a_start, a_end, b_start, b_end) -> float:
    inter = max(min(a_end, b_end) - max(a_start, b_start), 0.0)
    return inter / ((a_end - a_start) + (b_end - b_start) - inter)


def _class_ap(ground_truth: dict, detections: list, threshold: float) -> float:
    num_gt = sum(len(segments) for segments in ground_truth.values())
    taken = {vid: [False] * len(segments) for vid, segments in ground_truth.items()}
    hits = []
    for vid, _, start, end, _ in detections:
        candidates = [(tiou(start, end, s, e), j) for j, (s, e) in enumerate(ground_truth.get(vid, []))]
        candidates.sort(key=lambda c: (-c[0], -c[1]))  # best tIoU first, then listed later
        hit = False
        for value, j in candidates:
            if value < threshold:
                break
            if taken[vid][j]:
                continue  # fall back to the next-best ground truth
            taken[vid][j] = hit = True
            break
        hits.append(hit)
    return _interpolated_ap(hits, num_gt)


def _interpolated_ap(hits: list, num_gt: int) -> float:
    precision, recall, tp = [], [], 0
    for i, hit in enumerate(hits):
        tp += hit
        precision.append(tp / (i + 1))
        recall.append(tp / num_gt)
    precision = [0.0] + precision + [0.0]
    recall = [0.0] + recall + [1.0]
    for i in range(len(precision) - 2, -1, -1):
        precision[i] = max(precision[i], precision[i + 1])
    ap = 0.0
    for i in range(1, len(recall)):
        if recall[i] != recall[i - 1]:
            ap += (recall[i] - recall[i - 1]) * precision[i]
    assert math.isfinite(ap)
    return ap
