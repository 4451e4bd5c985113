"""``evaluate --plot DIR``: per-class AP bars and precision-recall curves (PNG).

matplotlib is an optional extra, imported only here and only when a figure is drawn. Figures
are built with the object API (no pyplot), so nothing depends on or changes a global backend.
"""
import os

import numpy as np

from losa_tal import InputError, open_output, output_errors
from .metrics import precision_recall

MAX_PR_PANELS = 24


def new_figure(width: float, height: float):
    """A matplotlib Figure rendered with Agg when saved, independent of pyplot."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise InputError("matplotlib is not installed; it draws the figures: "
                         "pip install 'losa-tal[plots]'") from None
    return Figure(figsize=(width, height), layout="constrained")


def save_figure(figure, path) -> str:
    """Render and write ``figure``, drawing every text literally.

    Class names, subsets and video ids come from user files: matplotlib would parse one with two
    ``$`` as mathtext and fail on it (``$\\frac{a$``). Tick labels are made while drawing, hence
    the rc setting as well as the flag on the texts that already exist.
    """
    from matplotlib import rc_context
    from matplotlib.text import Text

    with output_errors(path), rc_context({"text.parse_math": False}):
        for text in figure.findobj(Text):
            text.set_parse_math(False)
        with open_output(path) as file:  # the format from the name, as savefig(path) would
            figure.savefig(file, format=os.path.splitext(path)[1][1:] or None, dpi=110)
    return os.fspath(path)


def write_plots(evaluation, out_dir) -> list:
    """Write ``per_class_ap.png`` and ``precision_recall.png`` into ``out_dir``; returns paths."""
    return [plot_class_ap(evaluation, os.path.join(out_dir, "per_class_ap.png")),
            plot_precision_recall(evaluation, os.path.join(out_dir, "precision_recall.png"))]


def threshold_label(value: float) -> str:
    return f"tIoU {value:.3g}"


def plot_class_ap(evaluation, path) -> str:
    """Horizontal bars: each class's AP averaged over thresholds, best first."""
    classes = evaluation.gt.classes
    average_ap = evaluation.ap.mean(axis=1)
    order = np.argsort(-average_ap, kind="stable")
    figure = new_figure(7, 1.2 + 0.24 * len(classes))
    axes = figure.add_subplot()
    positions = np.arange(len(classes))
    axes.barh(positions, 100 * average_ap[order], color="tab:blue")
    axes.set_yticks(positions, [classes[i] for i in order], fontsize=8)
    axes.invert_yaxis()
    axes.axvline(100 * evaluation.average_mAP, color="black", linestyle="--",
                 label=f"average mAP {100 * evaluation.average_mAP:.2f}")
    axes.set_xlim(0, 100)
    axes.set_xlabel("AP (%), averaged over " + ", ".join(f"{t:.3g}" for t in evaluation.thresholds))
    axes.set_title(_subset_title(evaluation, "AP per class"))
    axes.legend(loc="lower right", fontsize=8)
    return save_figure(figure, path)


def plot_precision_recall(evaluation, path) -> str:
    """One panel per class (the most annotated ones if there are many), a curve per threshold."""
    classes, num_gt = evaluation.gt.classes, evaluation.gt.num_gt
    shown = np.argsort(-num_gt, kind="stable")[:MAX_PR_PANELS]
    shown = sorted(shown, key=lambda c: classes[c])
    columns = min(4, len(shown))
    rows = -(-len(shown) // columns)
    figure = new_figure(3.2 * columns, 2.6 * rows + 0.4)
    colours = _threshold_colours(len(evaluation.thresholds))
    for panel, c in enumerate(shown):
        axes = figure.add_subplot(rows, columns, panel + 1)
        tp = evaluation.matched[:, evaluation.class_rows(c)] >= 0
        precision, recall = precision_recall(tp, num_gt[c])
        for t, threshold in enumerate(evaluation.thresholds):
            axes.plot(np.r_[0.0, recall[t]], np.r_[1.0, precision[t]], color=colours[t],
                      linewidth=1, label=threshold_label(threshold))
        axes.set_title(f"{classes[c]} (AP {100 * evaluation.ap[c].mean():.1f})", fontsize=9)
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1.02)
        axes.tick_params(labelsize=7)
    figure.axes[0].legend(fontsize=6, loc="lower left")
    note = "" if len(shown) == len(classes) else f" ({len(shown)} of {len(classes)} classes)"
    figure.suptitle(_subset_title(evaluation, "Precision (y) against recall (x)" + note))
    return save_figure(figure, path)


def _threshold_colours(count: int):
    from matplotlib import colormaps

    return colormaps["viridis"](np.linspace(0, 0.9, count))


def _subset_title(evaluation, what: str) -> str:
    return f"{what}, subset '{evaluation.subset}'" if evaluation.subset else what
