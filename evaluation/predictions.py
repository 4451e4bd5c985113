"""Detections in the ActivityNet submission layout, parsed into flat numpy arrays.

``{"results": {video_id: [{"segment": [s, e], "label": name, "score": x}, ...]}}``

The file order is kept: it breaks ties between equal scores (a stable sort), as in the
evaluators the field uses. Parsing 200,000 detections must stay well under a second, so the
common case converts whole columns at once and only a bad file is walked item by item to name
the first bad entry.
"""
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter

import numpy as np

from losa_tal import input_error

from .annotations import MAX_SECONDS, is_finite_number, parse_label, parse_segment
from .files import cyclic_gc_paused, read_json_object, require_key

_SEGMENT, _LABEL, _SCORE = itemgetter("segment"), itemgetter("label"), itemgetter("score")


@dataclass(frozen=True)
class Predictions:
    """All detections of a file, one row each, in file order."""

    name: str  # the file path (or "<predictions>"), for messages
    video_ids: list  # unique video ids, file order
    video_index: np.ndarray  # int64 [N], index into video_ids
    segments: np.ndarray  # float64 [N, 2], seconds
    label_names: list  # unique labels, first-seen order
    label_index: np.ndarray  # int64 [N], index into label_names
    scores: np.ndarray  # float64 [N]

    def __len__(self):
        return len(self.scores)

    def for_video(self, video_id) -> dict:
        """One video's detections as ``{"segments", "labels", "scores"}`` (file order)."""
        if video_id not in self.video_ids:
            rows = np.zeros(0, dtype=np.int64)
        else:
            rows = np.flatnonzero(self.video_index == self.video_ids.index(video_id))
        return {"segments": self.segments[rows],
                "labels": [self.label_names[i] for i in self.label_index[rows]],
                "scores": self.scores[rows]}


def load_predictions(source) -> Predictions:
    """Parse a predictions JSON file (path) or an already-loaded dict; bad input -> InputError.

    A ``Predictions`` object is returned as it is.
    """
    if isinstance(source, Predictions):
        return source
    with cyclic_gc_paused():
        return _load(source)


def _load(source) -> Predictions:
    name, data = read_json_object(source, "predictions")
    results = require_key(name, data, "results")
    try:
        return _parse_columns(name, results)
    except (KeyError, TypeError, ValueError):
        pass
    _find_bad_entry(name, results)
    raise input_error(name, "malformed 'results'")  # unreachable unless the checks disagree


def _parse_columns(name, results) -> Predictions:
    """Fast path: raises KeyError/TypeError/ValueError on any irregularity."""
    counts, segments, labels, scores = [], [], [], []
    for items in results.values():
        if type(items) is not list:
            raise TypeError
        counts.append(len(items))
        segments += map(_SEGMENT, items)
        labels += map(_LABEL, items)
        scores += map(_SCORE, items)
    segment_array = _segment_array(segments)
    score_array = _numeric_array(scores, shape=(len(scores),))
    if np.any(segment_array[:, 1] < segment_array[:, 0]) \
            or np.any(np.abs(segment_array) > MAX_SECONDS):
        raise ValueError
    label_names = list(dict.fromkeys(labels))  # TypeError for unhashable labels
    if not all(isinstance(x, str) for x in label_names):
        raise TypeError
    code = {label: i for i, label in enumerate(label_names)}
    label_index = np.fromiter(map(code.__getitem__, labels), dtype=np.int64, count=len(labels))
    video_index = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    return Predictions(name, list(results), video_index, segment_array, label_names,
                       label_index, score_array)


def _segment_array(segments) -> np.ndarray:
    """float64 [N, 2] from N lists of two numbers (one flat list converts twice as fast)."""
    lengths = np.fromiter(map(len, segments), dtype=np.int64, count=len(segments))
    if np.any(lengths != 2):
        raise TypeError
    flat = _numeric_array(list(chain.from_iterable(segments)), shape=(2 * len(segments),))
    return flat.reshape(-1, 2)


def _numeric_array(values, shape) -> np.ndarray:
    array = np.array(values) if values else np.zeros(shape)
    if array.dtype.kind not in "iuf" or array.shape != shape:
        raise TypeError
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise ValueError
    return array


def _find_bad_entry(name, results):
    """Slow path: raise the InputError that names the first bad detection."""
    for vid, items in results.items():
        if not isinstance(items, list):
            raise input_error(name, f"video '{vid}': expected an array of detections")
        for index, item in enumerate(items):
            where = f"video '{vid}', detection {index}"
            if not isinstance(item, dict):
                raise input_error(name, f"{where}: expected an object")
            parse_segment(name, where, item)
            parse_label(name, where, item)
            if "score" not in item:
                raise input_error(name, f"{where}: 'score' is missing")
            if not is_finite_number(item["score"]):
                raise input_error(name, f"{where}: 'score' must be a finite number, "
                                  f"got {item['score']!r}")
