"""``evaluate --diagnose DIR``: why detections fail, in the manner of DETAD (Alwassel et al., 2018).

False positives, at each tIoU threshold t, fall in the first category that applies:
- ``double_detection``: tIoU >= t with ground truth of its class, which a better-ranked
  detection already took;
- ``wrong_label``: tIoU >= t with ground truth of another class;
- ``localization``: its class, 0.1 <= tIoU < t;
- ``confusion``: another class, 0.1 <= tIoU < t;
- ``background``: tIoU < 0.1 with every ground truth of the video.
The breakdown counts the best 10 x G detections of each class (G: its ground truth), as DETAD
does; the gain of removing each kind of error uses all detections.

Sensitivity: mAP over ground truth binned by action length and by the number of instances of
its class in its video. Detections that match ground truth outside the bin are left out, and AP
uses the normalised precision of Hoiem et al. (N = average ground truth per class) so that bins
of different sizes compare fairly.
"""
import os

import numpy as np

from .files import write_json_atomic
from .matching import pair_iou, pairs_with_equal_keys
from .metrics import average_precision

FALSE_POSITIVE_TYPES = ("double_detection", "wrong_label", "localization", "confusion",
                        "background")
TRUE_POSITIVE = -1
BACKGROUND_TIOU = 0.1
TOP_K_FACTOR = 10
INF = float("inf")
# (name, low, high]: DETAD's bins, in seconds and in instances per class per video.
LENGTH_BINS = (("XS", 0.0, 3.0), ("S", 3.0, 6.0), ("M", 6.0, 12.0), ("L", 12.0, 18.0),
               ("XL", 18.0, INF))
INSTANCE_BINS = (("XS", 0, 1), ("S", 1, 40), ("M", 40, 80), ("L", 80, INF))


def classify_false_positives(evaluation) -> np.ndarray:
    """int8 [T, P]: index into FALSE_POSITIVE_TYPES, or TRUE_POSITIVE, per threshold and detection."""
    same_class, other_class = _best_overlaps(evaluation)
    types = np.full(evaluation.matched.shape, TRUE_POSITIVE, dtype=np.int8)
    for t, threshold in enumerate(evaluation.thresholds):
        conditions = (same_class >= threshold, other_class >= threshold,
                      same_class >= BACKGROUND_TIOU, other_class >= BACKGROUND_TIOU)
        # np.select takes the first condition that holds, in the order of the categories.
        fp_type = np.select(conditions, range(len(conditions)), default=len(conditions))
        types[t] = np.where(evaluation.matched[t] >= 0, TRUE_POSITIVE, fp_type)
    return types


def _best_overlaps(evaluation):
    """Highest tIoU of each detection with ground truth of its class and of other classes."""
    gt, detections = evaluation.gt, evaluation.detections
    best = np.zeros((2, len(detections.scores)))
    for pair_det, pair_gt in pairs_with_equal_keys(detections.video, gt.video):
        iou = pair_iou(detections.segments, gt.segments, pair_det, pair_gt)
        same = gt.label[pair_gt] == detections.label[pair_det]
        np.maximum.at(best[0], pair_det[same], iou[same])
        np.maximum.at(best[1], pair_det[~same], iou[~same])
    return best[0], best[1]


def diagnose(evaluation) -> dict:
    """The diagnosis as a JSON-compatible dict (fractions in [0, 1])."""
    types = classify_false_positives(evaluation)
    return {
        "subset": evaluation.subset,
        "tiou_thresholds": evaluation.thresholds.tolist(),
        "average_mAP": evaluation.average_mAP,
        "false_positives": _false_positive_breakdown(evaluation, types),
        "removal_gain": _removal_gain(evaluation, types),
        "sensitivity": {
            "length": _sensitivity(evaluation, _gt_lengths(evaluation), LENGTH_BINS, "seconds"),
            "instances": _sensitivity(evaluation, _gt_instances(evaluation), INSTANCE_BINS,
                                      "instances of the class in the video"),
        },
    }


def _top_ranked(evaluation) -> np.ndarray:
    """bool [P]: the best TOP_K_FACTOR x G detections of each class."""
    keep = np.zeros(len(evaluation.detections.scores), dtype=bool)
    for c, num_gt in enumerate(evaluation.gt.num_gt):
        rows = evaluation.class_rows(c)
        keep[rows.start:min(rows.stop, rows.start + TOP_K_FACTOR * int(num_gt))] = True
    return keep


def _false_positive_breakdown(evaluation, types) -> dict:
    top = types[:, _top_ranked(evaluation)]
    per_threshold = []
    for t, threshold in enumerate(evaluation.thresholds):
        counts = {name: int(np.sum(top[t] == i)) for i, name in enumerate(FALSE_POSITIVE_TYPES)}
        per_threshold.append({"tiou": float(threshold),
                              "true_positives": int(np.sum(top[t] == TRUE_POSITIVE)),
                              "false_positives": counts})
    return {"top_k_factor": TOP_K_FACTOR, "per_threshold": per_threshold}


def _removal_gain(evaluation, types) -> dict:
    """Average-mAP gain if every false positive of one type were removed."""
    gain = {}
    for i, name in enumerate(FALSE_POSITIVE_TYPES):
        ap = np.zeros_like(evaluation.ap)
        for c, num_gt in enumerate(evaluation.gt.num_gt):
            rows = evaluation.class_rows(c)
            for t in range(len(evaluation.thresholds)):
                kept = types[t, rows] != i
                tp = evaluation.matched[t, rows][kept] >= 0
                ap[c, t] = average_precision(tp[None], num_gt)[0]
        gain[name] = float(ap.mean() - evaluation.average_mAP)
    return gain


def _gt_lengths(evaluation) -> np.ndarray:
    segments = evaluation.gt.segments
    return segments[:, 1] - segments[:, 0]


def _gt_instances(evaluation) -> np.ndarray:
    gt = evaluation.gt
    keys = gt.video * len(gt.classes) + gt.label
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    return counts[inverse]


def _sensitivity(evaluation, values, bins, unit) -> dict:
    """Normalised mAP restricted to the ground truth whose ``values`` fall in each bin."""
    gt = evaluation.gt
    normalizer = len(gt.label) / len(gt.classes)
    overall = _normalised_ap(evaluation, np.ones(len(gt.label), dtype=bool), normalizer)
    result = {"unit": unit, "average_mAP_N": float(np.nanmean(overall)), "bins": []}
    for name, low, high in bins:
        in_bin = (values > low) & (values <= high)
        ap = _normalised_ap(evaluation, in_bin, normalizer)
        evaluated = ~np.isnan(ap[:, 0])
        mean = ap[evaluated].mean(axis=0) if evaluated.any() else np.full(ap.shape[1], np.nan)
        result["bins"].append({
            "name": name, "range": [low, None if high == INF else high],
            "num_gt": int(in_bin.sum()), "num_classes": int(evaluated.sum()),
            "mAP_N": _json_floats(mean),
            "average_mAP_N": None if np.isnan(mean).any() else float(mean.mean()),
        })
    return result


def _normalised_ap(evaluation, in_bin, normalizer) -> np.ndarray:
    """[C, T] normalised AP over the ground truth in the bin; nan for classes with none there."""
    gt = evaluation.gt
    num_in_bin = np.bincount(gt.label[in_bin], minlength=len(gt.classes))
    ap = np.full(evaluation.ap.shape, np.nan)
    for c in np.flatnonzero(num_in_bin):
        matched = evaluation.matched[:, evaluation.class_rows(c)]
        for t in range(len(evaluation.thresholds)):
            # Hits on ground truth outside the bin are neither right nor wrong here: leave them out.
            kept = (matched[t] < 0) | in_bin[np.maximum(matched[t], 0)]
            tp = matched[t][kept] >= 0
            ap[c, t] = average_precision(tp[None], num_in_bin[c], normalizer)[0]
    return ap


def _json_floats(values) -> list:
    return [None if np.isnan(v) else float(v) for v in values]


def write_diagnosis(diagnosis: dict, out_dir) -> list:
    """Write ``diagnosis.json``, ``false_positives.png`` and ``sensitivity.png``; returns paths."""
    json_path = os.path.join(out_dir, "diagnosis.json")
    write_json_atomic(json_path, diagnosis)
    return [json_path,
            plot_false_positives(diagnosis, os.path.join(out_dir, "false_positives.png")),
            plot_sensitivity(diagnosis, os.path.join(out_dir, "sensitivity.png"))]


FP_COLOURS = {"true_positive": "tab:green", "double_detection": "tab:olive",
              "wrong_label": "tab:purple", "localization": "tab:orange",
              "confusion": "tab:pink", "background": "tab:gray"}


def plot_false_positives(diagnosis: dict, path) -> str:
    """Left: what the top-ranked detections are, per threshold. Right: gain of removing each."""
    from .plots import new_figure, save_figure

    figure = new_figure(11, 4)
    left, right = figure.subplots(1, 2, width_ratios=[3, 2])
    entries = diagnosis["false_positives"]["per_threshold"]
    labels = [f"{e['tiou']:.3g}" for e in entries]
    bottom = np.zeros(len(entries))
    for kind in ("true_positive",) + FALSE_POSITIVE_TYPES:
        counts = np.array([e["true_positives"] if kind == "true_positive"
                           else e["false_positives"][kind] for e in entries], dtype=float)
        total = np.array([e["true_positives"] + sum(e["false_positives"].values())
                          for e in entries], dtype=float)
        share = 100 * counts / np.maximum(total, 1)
        left.bar(labels, share, bottom=bottom, color=FP_COLOURS[kind],
                 label=kind.replace("_", " "))
        bottom += share
    left.set_xlabel("tIoU threshold")
    left.set_ylabel(f"% of the top {diagnosis['false_positives']['top_k_factor']} x G detections")
    left.set_ylim(0, 100)
    left.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    gains = diagnosis["removal_gain"]
    right.bar([k.replace("_", "\n") for k in gains], [100 * g for g in gains.values()],
              color=[FP_COLOURS[k] for k in gains])
    right.set_ylabel("average-mAP gain (points)")
    right.set_title("if this error were removed", fontsize=9)
    right.tick_params(axis="x", labelsize=7)
    figure.suptitle(f"False positives (average mAP {100 * diagnosis['average_mAP']:.2f})")
    return save_figure(figure, path)


def plot_sensitivity(diagnosis: dict, path) -> str:
    """Normalised average mAP per bin of action length and of instances per class and video."""
    from .plots import new_figure, save_figure

    figure = new_figure(10, 3.6)
    for axes, (key, title) in zip(figure.subplots(1, 2), (("length", "action length"),
                                                          ("instances", "instances per video"))):
        part = diagnosis["sensitivity"][key]
        names = [b["name"] for b in part["bins"]]
        values = [100 * (b["average_mAP_N"] or 0.0) for b in part["bins"]]
        bars = axes.bar(names, values, color="tab:blue")
        for bar, b in zip(bars, part["bins"]):
            axes.annotate(f"{_range_text(b['range'])}\n{b['num_gt']} gt",
                          (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                          ha="center", va="bottom", fontsize=7)
        axes.axhline(100 * part["average_mAP_N"], color="black", linestyle="--",
                     label=f"all: {100 * part['average_mAP_N']:.1f}")
        axes.set_ylim(0, 110)
        axes.set_ylabel("normalised average mAP (%)")
        axes.set_title(f"by {title} ({part['unit']})", fontsize=9)
        axes.legend(fontsize=7, loc="upper right")
    figure.suptitle("Sensitivity")
    return save_figure(figure, path)


def plot_sensitivity_comparison(models: dict, path) -> str:
    """Models side by side: ``{name: [diagnosis["sensitivity"], ...]}``, one entry per run
    (training seed); bars are the mean normalised average mAP per bin, error bars the spread."""
    from .plots import new_figure, save_figure

    figure = new_figure(11, 3.8)
    width = 0.8 / len(models)
    for axes, (key, title) in zip(figure.subplots(1, 2), (("length", "action length"),
                                                          ("instances", "instances per video"))):
        first = next(iter(models.values()))[0][key]
        bins = first["bins"]
        x = np.arange(len(bins))
        for i, (name, runs) in enumerate(models.items()):
            values = 100 * np.array([[b["average_mAP_N"] if b["average_mAP_N"] is not None
                                      else np.nan for b in run[key]["bins"]] for run in runs])
            # A bin without ground truth in a run is nan there: average over the runs that have
            # some (an empty bin draws as 0).
            seen = ~np.isnan(values)
            count = np.maximum(seen.sum(axis=0), 1)
            mean = np.where(seen, values, 0).sum(axis=0) / count
            spread = np.sqrt((np.where(seen, values - mean, 0) ** 2).sum(axis=0)
                             / np.maximum(count - 1, 1)) if len(runs) > 1 else None
            overall = 100 * np.mean([run[key]["average_mAP_N"] for run in runs])
            axes.bar(x + (i - (len(models) - 1) / 2) * width, mean, width, yerr=spread,
                     capsize=3, label=f"{name} (all: {overall:.1f})")
        runs_of_first = next(iter(models.values()))
        counts = [sum(run[key]["bins"][j]["num_gt"] for run in runs_of_first)
                  for j in range(len(bins))]
        axes.set_xticks(x, [f"{b['name']}\n{_range_text(b['range'])}\n{n} gt"
                            for b, n in zip(bins, counts)], fontsize=7)
        axes.set_ylim(0, 110)
        axes.set_ylabel("normalised average mAP (%)")
        axes.set_title(f"by {title} ({first['unit']})", fontsize=9)
        axes.legend(fontsize=7, loc="upper right")
    runs = len(next(iter(models.values())))
    figure.suptitle("Sensitivity" + (f", mean +- std over {runs} runs (gt: all runs)"
                                     if runs > 1 else ""))
    return save_figure(figure, path)


def _range_text(bounds) -> str:
    low, high = bounds
    return f"> {low:g}" if high is None else f"({low:g}, {high:g}]"
