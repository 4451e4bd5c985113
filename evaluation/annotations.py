"""Ground truth in the ActivityNet layout and the variants the field uses.

Handled layouts (all ``{"database": {video_id: {...}}}``):
- official ActivityNet: ``version``, ``taxonomy``; subsets training / validation / testing
  (testing has no annotations);
- ActionFormer: subsets ``Validation`` (its training split) / ``Test``, per video ``fps``,
  per segment ``label_id`` and ``segment(frames)`` (ignored: labels are matched by name);
- OpenTAD: subsets ``training`` / ``validation``, per video ``frame`` (the frame count).

``Ambiguous`` segments (THUMOS-14) are not a class: they are dropped. Ground truth is cleaned
once, here, so that training targets and evaluation see the same segments.
"""
import math
from dataclasses import dataclass, replace

import numpy as np

from losa_tal import input_error

from .files import cyclic_gc_paused, read_json_object, require_key

AMBIGUOUS = "Ambiguous"
# Segments shorter than this are annotation noise; same-label segments whose start and end are
# both this close to an already kept one are duplicates (THUMOS-14 has some).
MIN_SEGMENT_SECONDS = 1e-3
DUPLICATE_TOLERANCE_SECONDS = 1e-3
# No video lasts 31 years; near the float limit the tIoU sums overflow (inf - inf), so a perfect
# detection of a segment like [0, 1e308] would silently score 0.
MAX_SECONDS = 1e9

# Subset naming conventions, lower case, most specific first. ActionFormer calls its training
# split "Validation" and its test split "Test"; OpenTAD and ActivityNet evaluate on "validation"
# (ActivityNet's "testing" has no public annotations).
TEST_SUBSET_NAMES = ("test", "validation", "testing", "val")
TRAIN_SUBSET_NAMES = ("training", "train")


@dataclass(frozen=True)
class VideoAnnotation:
    """One video's cleaned ground truth. Times are in seconds."""

    duration: float | None
    fps: float | None
    segments: np.ndarray  # float64 [N, 2], (start, end)
    labels: list  # N class names
    num_frames: int | None = None
    subset: str | None = None


@dataclass(frozen=True)
class CleaningCounts:
    """How many ground-truth segments were dropped, and why."""

    too_short: int = 0
    duplicate: int = 0
    ambiguous: int = 0

    def __add__(self, other):
        return CleaningCounts(self.too_short + other.too_short,
                              self.duplicate + other.duplicate,
                              self.ambiguous + other.ambiguous)

    def as_dict(self) -> dict:
        return {"too_short": self.too_short, "duplicate": self.duplicate,
                "ambiguous": self.ambiguous}


class Annotations:
    """A parsed ground-truth file. Build it with :func:`load_annotations`."""

    def __init__(self, name, videos, cleaning):
        self.name = name  # the file path (or "<annotations>"), for messages
        self._videos = videos  # {video_id: VideoAnnotation}, file order
        self._cleaning = cleaning  # {video_id: CleaningCounts}
        self.subsets = list(dict.fromkeys(v.subset for v in videos.values() if v.subset))
        self.classes = sorted({label for v in videos.values() for label in v.labels})

    # -- subsets -------------------------------------------------------------------------------
    def resolve_subset(self, subset=None) -> str | None:
        """The subset name as written in the file, matched case-insensitively.

        ``None`` means the test split (see :attr:`test_subset`). Returns ``None`` only for a file
        that names no subsets at all, where every video is selected.
        """
        if not self.subsets:
            if subset is None:
                return None
            raise input_error(self.name, f"subset '{subset}' requested, but no video has a subset")
        if subset is None:
            found = self.test_subset
            if found is None:
                raise input_error(self.name, "cannot tell which subset is the test split; choose "
                                  f"one with `subset` (subsets: {', '.join(self.subsets)})")
            return found
        found = self._subset_named(subset)
        if found is None:
            raise input_error(self.name, f"no video in subset '{subset}' "
                              f"(subsets: {', '.join(self.subsets)})")
        return found

    @property
    def test_subset(self) -> str | None:
        """The split to evaluate on by convention, or None if the names do not say."""
        for name in TEST_SUBSET_NAMES:
            if found := self._subset_named(name):
                return found
        return self.subsets[0] if len(self.subsets) == 1 else None

    @property
    def train_subset(self) -> str | None:
        """The split to train on by convention, or None if the names do not say."""
        for name in TRAIN_SUBSET_NAMES:
            if found := self._subset_named(name):
                return found
        if self._subset_named("test"):
            return self._subset_named("validation")  # ActionFormer's convention (or None)
        return None

    def _subset_named(self, subset: str) -> str | None:
        # Several spellings of one name ("Test", "test") would all be returned by videos().
        for name in self.subsets:
            if name.lower() == str(subset).lower():
                return name
        return None

    # -- videos --------------------------------------------------------------------------------
    def videos(self, subset=None) -> dict:
        """``{video_id: VideoAnnotation}`` of one subset (default: the test split), file order."""
        name = self.resolve_subset(subset)
        if name is None:
            return dict(self._videos)
        key = name.lower()
        return {vid: v for vid, v in self._videos.items() if (v.subset or "").lower() == key}

    def video(self, video_id) -> VideoAnnotation:
        """One video's annotation, whatever its subset."""
        if video_id not in self._videos:
            raise input_error(self.name, f"no video '{video_id}'")
        return self._videos[video_id]

    def select(self, video_ids, relabel=None) -> "Annotations":
        """These videos only, each label mapped through ``relabel`` (a function of the label).

        Segments that a relabelling makes duplicates (the same times, two labels become one)
        are cleaned as on loading, and counted with the segments dropped then.
        """
        videos, cleaning = {}, {}
        for vid in video_ids:
            video, counts = self.video(vid), self._cleaning[vid]
            if relabel is not None:
                segments, labels, more = clean_ground_truth(
                    video.segments.tolist(), [relabel(label) for label in video.labels])
                video, counts = replace(video, segments=segments, labels=labels), counts + more
            videos[vid], cleaning[vid] = video, counts
        return Annotations(self.name, videos, cleaning)

    def cleaning(self, video_ids) -> CleaningCounts:
        """Segments dropped while cleaning these videos."""
        return sum((self._cleaning[vid] for vid in video_ids), CleaningCounts())

    def __repr__(self):
        return (f"Annotations({self.name!r}, {len(self._videos)} videos, "
                f"{len(self.classes)} classes, subsets={self.subsets})")


def load_annotations(source) -> Annotations:
    """Parse a ground-truth JSON file (path) or an already-loaded dict; bad input -> InputError.

    An ``Annotations`` object is returned as it is, so every API function takes all three.
    """
    if isinstance(source, Annotations):
        return source
    with cyclic_gc_paused():
        return _load(source)


def _load(source) -> Annotations:
    name, data = read_json_object(source, "annotations", warn_duplicate_keys=True)
    database = require_key(name, data, "database")
    videos, cleaning = {}, {}
    for vid, entry in database.items():
        videos[vid], cleaning[vid] = _parse_video(name, vid, entry)
    if not videos:
        raise input_error(name, "'database' has no videos")
    return Annotations(name, videos, cleaning)


def _parse_video(name, vid, entry):
    where = f"video '{vid}'"
    if not isinstance(entry, dict):
        raise input_error(name, f"{where}: expected an object")
    subset = entry.get("subset")
    if subset is not None and not isinstance(subset, str):
        raise input_error(name, f"{where}: 'subset' must be a string")
    annotations = entry.get("annotations", [])
    if not isinstance(annotations, list):
        raise input_error(name, f"{where}: 'annotations' must be an array")
    segments, labels = [], []
    for index, item in enumerate(annotations):
        item_where = f"{where}, annotation {index}"
        if not isinstance(item, dict):
            raise input_error(name, f"{item_where}: expected an object")
        segments.append(parse_segment(name, item_where, item))
        labels.append(parse_label(name, item_where, item))
    segments, labels, counts = clean_ground_truth(segments, labels)
    video = VideoAnnotation(
        duration=_optional_number(name, where, entry, "duration", minimum=0.0),
        fps=_optional_number(name, where, entry, "fps", minimum=0.0, strict=True),
        segments=segments,
        labels=labels,
        num_frames=_optional_count(name, where, entry, "frame"),
        subset=subset,
    )
    return video, counts


def clean_ground_truth(segments, labels):
    """Drop Ambiguous, too-short and duplicate segments; keeps the file order of the rest."""
    counts = {"too_short": 0, "duplicate": 0, "ambiguous": 0}
    kept_segments, kept_labels = [], []
    kept_cells = {}  # (label, start cell, end cell) -> kept (start, end) in that cell
    for (start, end), label in zip(segments, labels):
        if label == AMBIGUOUS:
            counts["ambiguous"] += 1
        elif end - start < MIN_SEGMENT_SECONDS:
            counts["too_short"] += 1
        elif _is_duplicate(start, end, label, kept_cells):
            counts["duplicate"] += 1
        else:
            kept_segments.append((start, end))
            kept_labels.append(label)
            kept_cells.setdefault((label, *_cell(start, end)), []).append((start, end))
    array = np.array(kept_segments, dtype=np.float64).reshape(-1, 2)
    return array, kept_labels, CleaningCounts(**counts)


def _cell(start, end) -> tuple[int, int]:
    return math.floor(start / DUPLICATE_TOLERANCE_SECONDS), \
        math.floor(end / DUPLICATE_TOLERANCE_SECONDS)


def _is_duplicate(start, end, label, kept_cells) -> bool:
    """Within the tolerance of a kept segment of the same label, at both ends. Kept segments
    are filed by tolerance-sized cells of (start, end), so only the neighbouring cells are
    searched (linear in the segments, not quadratic), with the same result as comparing with
    every kept one. Identical segments with different labels are genuine (THUMOS:
    CricketBowling/CricketShot)."""
    start_cell, end_cell = _cell(start, end)
    return any(
        abs(start - kept_start) <= DUPLICATE_TOLERANCE_SECONDS
        and abs(end - kept_end) <= DUPLICATE_TOLERANCE_SECONDS
        for near_start in range(start_cell - 2, start_cell + 3)
        for near_end in range(end_cell - 2, end_cell + 3)
        for kept_start, kept_end in kept_cells.get((label, near_start, near_end), ())
    )


# -- field checks shared with predictions.py ---------------------------------------------------
def is_finite_number(value) -> bool:
    """A JSON number (not a bool, not NaN/Infinity, not too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def parse_segment(name, where, item) -> tuple:
    """``item["segment"]`` as ``(start, end)`` floats; InputError unless two ordered finite numbers."""
    if "segment" not in item:
        raise input_error(name, f"{where}: 'segment' is missing")
    segment = item["segment"]
    if not (isinstance(segment, list) and len(segment) == 2
            and all(is_finite_number(x) for x in segment)):
        raise input_error(name, f"{where}: segment must be two finite numbers, got {segment!r}")
    start, end = float(segment[0]), float(segment[1])
    if max(abs(start), abs(end)) > MAX_SECONDS:
        raise input_error(name, f"{where}: segment times must lie within +-{MAX_SECONDS:g} "
                          f"seconds, got {segment!r}")
    if end < start:
        raise input_error(name, f"{where}: segment ends before it starts ({start} > {end})")
    return start, end


def parse_label(name, where, item) -> str:
    if "label" not in item:
        raise input_error(name, f"{where}: 'label' is missing")
    label = item["label"]
    if not isinstance(label, str):
        raise input_error(name, f"{where}: 'label' must be a class name (string), got {label!r}")
    return label


def _optional_number(name, where, entry, key, minimum, strict=False):
    if entry.get(key) is None:
        return None
    value = entry[key]
    if not is_finite_number(value) or value < minimum or (strict and value == minimum):
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise input_error(name, f"{where}: '{key}' must be a finite number {bound}, got {value!r}")
    return float(value)


def _optional_count(name, where, entry, key):
    if entry.get(key) is None:
        return None
    value = entry[key]
    if not is_finite_number(value) or value < 0 or value != int(value):
        raise input_error(name, f"{where}: '{key}' must be a whole number of frames, got {value!r}")
    return int(value)
