"""The ActivityNet protocol's labelling step: class-agnostic detections x video-level class scores.

Published ActivityNet results (ActionFormer, OpenTAD, LoSA) come from a detector that finds
actions without naming them, and an external video-level classifier (the "CUHK" scores) that
names them. Per video, :func:`fuse_predictions` keeps the ``top_detections`` best detections,
takes the ``topk`` classes of highest video-level score and emits every kept detection once per
such class with score ``sqrt(detection score x class score)``: ActionFormer's rule (OpenTAD's
plain product ranks the same). Detection labels are ignored.

Equal scores are ordered as ActionFormer orders them, by an ascending sort reversed: the one
listed later comes first. Detections are written class by class, best first, as ActionFormer
does, since the evaluator breaks ties in score by file order.

Score files, ``{"results": {video: ...}}`` in either layout:
- CUHK: ``{"results": {video: [C scores]}, "class": [C names]}``, the names in score order;
- by name: ``{"results": {video: {label: score}}}``.
Video ids match with or without ActivityNet's ``v_`` prefix.
"""
from dataclasses import dataclass

import numpy as np

from losa_tal import ConfigError, input_error

from .annotations import is_finite_number
from .files import cyclic_gc_paused, read_json_object, require_key
from .predictions import load_predictions

TOPK = 2  # classes per video (ActionFormer's and OpenTAD's ActivityNet setting)
TOP_DETECTIONS = 200  # detections kept per video before fusion (ActionFormer's num_pred)
VIDEO_PREFIX = "v_"  # ActivityNet's YouTube ids appear with and without it


@dataclass(frozen=True)
class VideoScores:
    """Video-level class scores, as read; each video's entry is checked when it is used."""

    name: str  # the file, for messages
    results: dict  # video -> [C scores] (CUHK layout) or {label: score}
    classes: list | None  # CUHK layout: the C class names, in score order; else None

    def lookup(self, video_id: str, wanted_by: str):
        """``(labels, float64 scores)`` of one video; its id may differ by the ``v_`` prefix."""
        entry = self.results.get(video_id)
        if entry is None:
            other = (video_id[len(VIDEO_PREFIX):] if video_id.startswith(VIDEO_PREFIX)
                     else VIDEO_PREFIX + video_id)
            entry = self.results.get(other)
        if entry is None:
            raise input_error(self.name, f"no scores for video '{video_id}' (of {wanted_by})")
        labels, values = self._split(video_id, entry)
        scores = np.array(values)
        if scores.dtype.kind in "iuf" and scores.ndim == 1 and np.all(np.isfinite(scores) & (scores >= 0)):
            return labels, scores.astype(np.float64)
        bad = next((v for v in values if not is_finite_number(v) or v < 0), values)
        raise input_error(self.name, f"video '{video_id}': scores must be finite numbers >= 0, "
                          f"got {bad!r}")

    def _split(self, video_id, entry):
        if self.classes is not None:
            if not isinstance(entry, list) or len(entry) != len(self.classes):
                count = f"{len(entry)} scores" if isinstance(entry, list) else "not a list"
                raise input_error(self.name, f"video '{video_id}': {count}, expected "
                                  f"{len(self.classes)} (one per name in 'class')")
            return self.classes, entry
        if not isinstance(entry, dict) or not entry:
            raise input_error(self.name, f"video '{video_id}': expected an object "
                              "{label: score} (or a list of scores and a 'class' list)")
        return list(entry), list(entry.values())

    def top_classes(self, video_id: str, topk: int, wanted_by: str):
        """The ``topk`` best ``(labels, scores)`` of a video, best first."""
        labels, scores = self.lookup(video_id, wanted_by)
        best = descending_order(scores)[:topk]
        return [labels[i] for i in best], scores[best]


def load_video_scores(source) -> VideoScores:
    """Parse a video-level scores file (path or dict); the layout problems name the file."""
    if isinstance(source, VideoScores):
        return source
    with cyclic_gc_paused():
        name, data = read_json_object(source, "video scores")
    results = require_key(name, data, "results")
    classes = None
    if "class" in data:
        classes = data["class"]
        if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
            raise input_error(name, "'class' must be a non-empty array of class names")
        if len(set(classes)) != len(classes):
            raise input_error(name, "'class' names a class twice")
    return VideoScores(name, results, classes)


def descending_order(scores: np.ndarray) -> np.ndarray:
    """Indices from the highest score down; equal scores: the later one first (as ActionFormer)."""
    return np.argsort(scores, kind="stable")[::-1]


def fuse_predictions(predictions, video_scores, topk: int = TOPK,
                     top_detections: int = TOP_DETECTIONS) -> dict:
    """Label class-agnostic detections with video-level scores (see the module docstring).

    ``predictions``/``video_scores``: parsed objects, paths or dicts. Returns a predictions dict.
    Every video of the predictions needs scores; a problem raises InputError before any result.
    """
    predictions, video_scores = load_predictions(predictions), load_video_scores(video_scores)
    for key, value in (("topk", topk), ("top_detections", top_detections)):
        if value < 1:
            raise ConfigError(key, f"must be at least 1, got {value}")
    if np.any(predictions.scores < 0):
        raise input_error(predictions.name, "detection scores must be >= 0 to fuse (a square "
                          f"root is taken), got {predictions.scores.min()!r}")
    kept = _best_per_video(predictions, top_detections)
    with cyclic_gc_paused():  # 10^6 new lists and dicts: the collector would run over and over
        results = _fused_results(predictions, video_scores, kept, topk)
    return {"version": "losa-tal fuse", "results": results,
            "external_data": {"used": True, "details": f"video-level class scores from "
                              f"{video_scores.name}: top-{topk} classes, score sqrt(det x cls)"}}


def _fused_results(predictions, video_scores, kept, topk) -> dict:
    results = {}
    for index, vid in enumerate(predictions.video_ids):
        rows = kept[index]
        labels, class_scores = video_scores.top_classes(vid, topk, predictions.name)
        segments = predictions.segments[rows].tolist()
        fused = np.sqrt(class_scores[:, None] * predictions.scores[rows][None, :]).tolist()
        results[vid] = [{"segment": segment, "label": label, "score": score}
                        for label, row in zip(labels, fused)
                        for segment, score in zip(segments, row)]
    return results


def _best_per_video(predictions, top_detections: int) -> list:
    """Per video (in ``video_ids`` order), its best rows, best first (ties: later row first)."""
    rows = np.arange(len(predictions))
    # video ascending, then score descending, then row descending
    order = np.lexsort((-rows, -predictions.scores, predictions.video_index))
    video = predictions.video_index[order]
    bounds = np.searchsorted(video, np.arange(len(predictions.video_ids) + 1))
    return [order[start:min(stop, start + top_detections)]
            for start, stop in zip(bounds[:-1], bounds[1:])]
