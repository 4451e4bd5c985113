"""``visualize``: one video's ground truth against its detections, on a time axis.

Detections are drawn best first, one row each, green when they are a true positive at the chosen
tIoU threshold and red otherwise (the matching is the evaluation's, restricted to this video,
which gives the same answer because detections compete only within a video). Without ground
truth (``annotations=None``: a video nobody annotated, as ``detect`` draws) they are drawn as
detections, in one colour. With the video file, a row of frame thumbnails (decoded with decord)
sits above the time axis.
"""
import os
import sys
from contextlib import contextmanager

import numpy as np

from losa_tal import ConfigError, InputError, input_error

from .annotations import VideoAnnotation, load_annotations
from .matching import greedy_match
from .predictions import load_predictions

NUM_THUMBNAILS = 8
COLOURS = {"gt": "tab:blue", "tp": "tab:green", "fp": "tab:red", "detection": "tab:orange"}


def plot_timeline(annotations, predictions, video_id, out_path, video_file=None,
                  tiou_threshold=0.5, top=None) -> str:
    """Draw the timeline of ``video_id`` into the PNG ``out_path``; returns the path.

    ``annotations``/``predictions``: parsed objects, paths or dicts; ``annotations`` None: no
    ground truth. ``top``: detections to draw, best first (default max(10, 2 x the video's
    ground truth)).
    """
    if not 0.0 < tiou_threshold <= 1.0:
        raise ConfigError("tiou_threshold", f"threshold {tiou_threshold!r} is outside (0, 1]")
    predictions = load_predictions(predictions)
    detections = predictions.for_video(video_id)
    if annotations is None:
        video = VideoAnnotation(duration=None, fps=None, segments=np.zeros((0, 2)), labels=[],
                                num_frames=None, subset=None)
        is_tp = None
    else:
        video = load_annotations(annotations).video(video_id)
        is_tp = match_one_video(video, detections, tiou_threshold)
    top = max(10, 2 * len(video.labels)) if top is None else top
    shown = np.argsort(-detections["scores"], kind="stable")[:max(top, 0)]
    thumbnails = read_thumbnails(video_file, NUM_THUMBNAILS) if video_file else None
    end = _time_extent(video, detections)
    figure = _draw(video_id, video, detections, is_tp, shown, thumbnails, end, tiou_threshold)
    from .plots import save_figure

    return save_figure(figure, out_path)


def match_one_video(video, detections, tiou_threshold) -> np.ndarray:
    """bool [n]: which of the video's detections are true positives at the threshold."""
    labels = sorted(set(video.labels) | set(detections["labels"]))
    code = {label: i for i, label in enumerate(labels)}
    order = np.argsort(-detections["scores"], kind="stable")
    pred_keys = np.array([code[x] for x in detections["labels"]], dtype=np.int64)[order]
    gt_keys = np.array([code[x] for x in video.labels], dtype=np.int64)
    matched = greedy_match(detections["segments"][order].reshape(-1, 2), pred_keys,
                           video.segments, gt_keys, [tiou_threshold])[0]
    is_tp = np.zeros(len(order), dtype=bool)
    is_tp[order] = matched >= 0
    return is_tp


def read_thumbnails(video_file, count: int):
    """``(times [count] s, frames [count, H, W, 3] uint8)`` evenly spread over the video."""
    if not os.path.isfile(video_file):
        raise input_error(video_file, "no such file")
    try:
        import decord
    except ImportError:
        raise InputError("decord is not installed; it reads `video_file`") from None
    try:
        with _native_stderr_silenced():
            reader = decord.VideoReader(os.fspath(video_file), ctx=decord.cpu(0))
            num_frames, fps = len(reader), reader.get_avg_fps()
            times = (np.arange(count) + 0.5) * (num_frames / fps) / count
            indices = np.minimum((times * fps).astype(int), num_frames - 1)
            frames = reader.get_batch(indices.tolist()).asnumpy()
    except (RuntimeError, decord.DECORDError, ZeroDivisionError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise input_error(video_file, f"cannot decode the video ({reason})") from None
    return (indices + 0.5) / fps, frames


@contextmanager
def _native_stderr_silenced():
    """FFmpeg and decord log straight to file descriptor 2; our error message says it all."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _time_extent(video, detections) -> float:
    ends = [video.duration or 0.0]
    ends += [video.segments[:, 1].max()] if len(video.segments) else []
    ends += [detections["segments"][:, 1].max()] if len(detections["segments"]) else []
    return max(max(ends), 1e-3)


def _draw(video_id, video, detections, is_tp, shown, thumbnails, end, tiou_threshold):
    from .plots import new_figure

    num_rows = max(len(set(video.labels)) + len(shown), 1)
    thumb_height = 1.4 if thumbnails is not None else 0.0
    figure = new_figure(12, 1.6 + thumb_height + 0.24 * num_rows)  # checks matplotlib first
    from matplotlib.patches import Patch

    if thumbnails is not None:
        grid = figure.add_gridspec(2, NUM_THUMBNAILS,
                                   height_ratios=[thumb_height, 0.24 * num_rows + 0.8])
        _draw_thumbnails(figure, grid, *thumbnails)
        axes = figure.add_subplot(grid[1, :])
        for time in thumbnails[0]:
            axes.axvline(time, color="0.8", linewidth=0.8, zorder=0)
    else:
        axes = figure.add_subplot()
    names = _draw_rows(axes, video, detections, is_tp, shown)
    axes.set_yticks(range(len(names)), names, fontsize=7)
    axes.set_ylim(len(names) - 0.5, -0.5)
    axes.set_xlim(0, end)
    axes.set_xlabel("time (s)")
    kinds = (("detection", "detection"),) if is_tp is None else \
        (("gt", "ground truth"), ("tp", "true positive"), ("fp", "false positive"))
    legend = [Patch(color=COLOURS[key], label=text) for key, text in kinds]
    axes.legend(handles=legend, fontsize=7, ncols=3, loc="lower right", bbox_to_anchor=(1.0, 1.0))
    title = f"{video_id}: best {len(shown)} of {len(detections['scores'])} detections" \
        if is_tp is None else (f"{video_id}: {len(video.labels)} ground-truth segments, best "
                               f"{len(shown)} of {len(detections['scores'])} detections (TP/FP "
                               f"at tIoU {tiou_threshold:g})")
    figure.suptitle(title, fontsize=10)
    return figure


def _draw_rows(axes, video, detections, is_tp, shown) -> list:
    """A row per ground-truth class, then a row per shown detection; returns the row names.
    ``is_tp`` None: no ground truth, every detection in the detection colour."""
    names = []
    for label in sorted(set(video.labels)):
        spans = [(s, e - s) for (s, e), x in zip(video.segments, video.labels) if x == label]
        axes.broken_barh(spans, (len(names) - 0.4, 0.8), color=COLOURS["gt"])
        names.append(f"GT {label}")
    scores = detections["scores"]
    top_score = max(scores[shown].max(), 1e-12) if len(shown) else 1.0
    for i in shown:
        start, stop = detections["segments"][i]
        alpha = min(0.3 + 0.7 * max(scores[i], 0.0) / top_score, 1.0)  # fainter = less sure
        kind = "detection" if is_tp is None else "tp" if is_tp[i] else "fp"
        axes.broken_barh([(start, stop - start)], (len(names) - 0.4, 0.8),
                         color=COLOURS[kind], alpha=alpha)
        names.append(f"{detections['labels'][i]} {scores[i]:.2f}")
    return names


def _draw_thumbnails(figure, grid, times, frames):
    for column, (time, frame) in enumerate(zip(times, frames)):
        axes = figure.add_subplot(grid[0, column])
        axes.imshow(frame)
        axes.set_title(f"{time:.1f} s", fontsize=7)
        axes.axis("off")
