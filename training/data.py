"""Training and inference samples cut from a feature store, with ground truth on the feature grid.

A *sample* is a stretch of one video's cached features plus the ground truth that falls inside it,
in feature steps relative to the stretch. Its ``step_offset`` and ``step_scale`` give the affine map
back to the video's own steps, and the video's recorded feature times turn those into seconds:

    video_step = (sample_step + 0.5) / step_scale - 0.5 + step_offset

Window mode (THUMOS) crops stretches of at most ``max_seq_len`` steps (``step_scale`` 1); resize
mode (ActivityNet) resamples each whole video to ``resize_len`` steps (``step_offset`` 0).

All randomness comes from ``numpy.random.default_rng([seed, epoch, index])``, so a sample does not
depend on which process or worker reads it, nor on what was read before: this is what makes
resumed and multi-process runs repeat an uninterrupted single-process run exactly.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from losa_tal import input_error

AGNOSTIC_LABEL = "action"  # the one class of a data.class_agnostic head


# ---------------------------------------------------------------------------------------------
# Seconds <-> feature steps, through the times the store recorded for each step.

def seconds_to_steps(seconds, times) -> np.ndarray:
    """Fractional feature-step positions of times in seconds (linear beyond either end)."""
    return _interp_linear_ends(np.asarray(seconds, np.float64), times, np.arange(len(times)))


def steps_to_seconds(steps, times) -> np.ndarray:
    """Inverse of :func:`seconds_to_steps`."""
    return _interp_linear_ends(np.asarray(steps, np.float64), np.arange(len(times)), times)


def _interp_linear_ends(x, xp, fp) -> np.ndarray:
    xp = np.asarray(xp, np.float64)
    fp = np.asarray(fp, np.float64)
    y = np.interp(x, xp, fp)
    if len(xp) < 2:
        return y
    # Actions may start before the first clip centre or end after the last one.
    before, after = x < xp[0], x > xp[-1]
    y[before] = fp[0] + (x[before] - xp[0]) * (fp[1] - fp[0]) / (xp[1] - xp[0])
    y[after] = fp[-1] + (x[after] - xp[-1]) * (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])
    return y


# ---------------------------------------------------------------------------------------------
# Ground truth per video.

def head_classes(annotations, data_config) -> list:
    """The head's output classes: the annotation file's, or one for ``data.class_agnostic``."""
    return [AGNOSTIC_LABEL] if data_config.class_agnostic else list(annotations.classes)


def head_label(label: str, data_config) -> str:
    """The head class an annotated label trains (every label is one action when agnostic)."""
    return AGNOSTIC_LABEL if data_config.class_agnostic else label


@dataclass
class VideoTruth:
    """One video's ground truth on its feature grid.

    Identical segments with different labels stay separate rows; the head's target assignment
    turns them into one multi-label target.
    """

    num_steps: int
    segments: np.ndarray  # float64 [N, 2], feature steps
    labels: np.ndarray  # int64 [N], class indices


def video_truth(annotation, times, class_index: dict) -> VideoTruth:
    """Map one video's annotated segments (seconds) onto the grid of its ``times``."""
    num_steps = len(times)
    known = [i for i, label in enumerate(annotation.labels) if label in class_index]
    seconds = np.asarray(annotation.segments, np.float64).reshape(-1, 2)[known]
    steps = np.clip(seconds_to_steps(seconds, times), 0, num_steps - 1).reshape(-1, 2)
    labels = np.array([class_index[annotation.labels[i]] for i in known], np.int64)
    keep = steps[:, 1] > steps[:, 0]  # drops segments wholly outside the features
    return VideoTruth(num_steps, steps[keep], labels[keep])


# ---------------------------------------------------------------------------------------------
# The dataset.

class StoreDataset(torch.utils.data.Dataset):
    """Samples of the annotated videos of one subset that the store holds.

    ``train=True`` gives one random sample per video per epoch (call :meth:`set_epoch`);
    ``train=False`` gives every inference piece of every video, in a fixed order.
    """

    def __init__(self, store, store_path, annotations, annotations_path, subset: str,
                 classes, layers, data_config, train: bool, seed: int = 0,
                 max_videos: int | None = None):
        self.store = store
        self.store_path = str(store_path)
        self.subset = subset
        self.layers = list(layers)  # intermediate layers read; empty for head-only
        self.config = data_config
        self.train = train
        self.seed = seed
        self.epoch = 0
        wanted = annotations.videos(subset)
        index = {name: i for i, name in enumerate(classes)}
        self.class_index = {label: index[head_label(label, data_config)]
                            for label in annotations.classes
                            if head_label(label, data_config) in index}
        present = [vid for vid in sorted(wanted) if vid in store]
        if not present:
            raise input_error(store_path, f"holds none of the {len(wanted)} '{subset}' videos "
                              f"of {annotations_path}")
        if len(present) < len(wanted):
            warnings.warn(f"{store_path}: {len(wanted) - len(present)} of {len(wanted)} "
                          f"'{subset}' videos in {annotations_path} are not in the store; "
                          "skipping them", stacklevel=2)
        if max_videos is not None:
            present = present[:max_videos]
        self.videos = present
        self.times = {vid: np.asarray(store.feature_times(vid), np.float64) for vid in present}
        self.truth = {vid: video_truth(wanted[vid], self.times[vid], self.class_index)
                      for vid in present}
        self.pieces = [] if train else [(vid, start, stop) for vid in present
                                        for start, stop in self._inference_pieces(vid)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return len(self.videos) if self.train else len(self.pieces)

    def __getitem__(self, index):
        if self.train:
            vid = self.videos[index]
            rng = np.random.default_rng([self.seed, self.epoch, index])
            start, stop = self._training_window(vid, rng)
        else:
            vid, start, stop = self.pieces[index]
        return self._sample(vid, start, stop)

    # -- which stretch of a video ------------------------------------------------------------

    def _training_window(self, vid, rng):
        """ActionFormer's crop (truncate_feats): a video longer than max_seq_len gets a window
        of max_seq_len steps; a shorter one a window of a random length in crop_ratio of its
        own (whole if that comes out at its length); starts are drawn up to window_tries times
        until the window keeps an action."""
        num_steps = self.truth[vid].num_steps
        length, ratio = self.config.max_seq_len, self.config.crop_ratio
        if self.config.mode == "resize" or (num_steps <= length and ratio is None):
            return 0, num_steps
        if num_steps <= length:
            length = int(rng.integers(max(round(ratio[0] * num_steps), 1),
                                      min(round(ratio[1] * num_steps), num_steps) + 1))
            if length == num_steps:
                return 0, num_steps
        segments = self.truth[vid].segments
        for _ in range(self.config.window_tries):
            start = int(rng.integers(0, num_steps - length + 1))
            if _kept_inside(segments, start, start + length, self.config.min_action_inside).any():
                break
        return start, start + length

    def _inference_pieces(self, vid):
        num_steps = self.truth[vid].num_steps
        window = self.config.infer_window
        if self.config.mode == "resize" or window is None or num_steps <= window:
            return [(0, num_steps)]
        stride = max(1, int(window * (1 - self.config.infer_overlap)))
        starts = list(range(0, num_steps - window, stride)) + [num_steps - window]
        return [(start, start + window) for start in starts]

    # -- reading it ----------------------------------------------------------------------------

    def _sample(self, vid, start, stop) -> dict:
        from store import LAST

        read = self.store.read(vid, layers=(LAST, *self.layers), start=start, stop=stop)
        last = torch.from_numpy(np.ascontiguousarray(read[LAST], np.float32))
        inter = None
        if self.layers:
            inter = torch.from_numpy(np.stack([read[i] for i in self.layers]).astype(np.float32))
        truth = self.truth[vid]
        inside = _kept_inside(truth.segments, start, stop, self.config.min_action_inside)
        segments = np.clip(truth.segments[inside], start, stop) - start
        labels = truth.labels[inside]
        scale = 1.0
        if self.config.mode == "resize":
            last, inter, scale = _resample(last, inter, self.config.resize_len)
            segments = (segments + 0.5) * scale - 0.5
        return {
            "video": vid,
            "last": last,  # [T, D]
            "inter": inter,  # [L, T, K, D] or None
            "segments": torch.from_numpy(segments.astype(np.float32)).reshape(-1, 2),
            "labels": torch.from_numpy(labels),  # [N] class indices
            "step_offset": start,
            "step_scale": scale,
        }


def _kept_inside(segments, start, stop, min_inside) -> np.ndarray:
    """Segments that keep at least ``min_inside`` of their length inside [start, stop], the
    window as ActionFormer measures it (its end one step past the last step it holds)."""
    overlap = np.minimum(segments[:, 1], stop) - np.maximum(segments[:, 0], start)
    length = segments[:, 1] - segments[:, 0]
    return overlap >= min_inside * length - 1e-9


def _resample(last, inter, length):
    """Linearly resample a stretch of features to ``length`` steps (ActivityNet mode)."""
    num_steps = last.shape[0]
    last = F.interpolate(last.T[None], size=length, mode="linear", align_corners=False)[0].T
    if inter is not None:
        layers, _, tokens, dim = inter.shape
        flat = inter.permute(0, 2, 3, 1).reshape(1, layers * tokens * dim, num_steps)
        flat = F.interpolate(flat, size=length, mode="linear", align_corners=False)
        inter = flat.reshape(layers, tokens, dim, length).permute(0, 3, 1, 2).contiguous()
    return last.contiguous(), inter, length / num_steps


def to_video_steps(steps, sample) -> np.ndarray:
    """Sample-relative steps back to the video's own feature steps."""
    return (np.asarray(steps, np.float64) + 0.5) / sample["step_scale"] - 0.5 + sample["step_offset"]


# ---------------------------------------------------------------------------------------------
# Per-channel statistics for ``data.standardise``.

STD_FLOOR = 1e-6  # a constant channel is centred but not blown up


def channel_statistics(store, videos, layers) -> dict:
    """Mean and std per channel over every clip and token of ``videos``, in float64.

    Returns ``last_mean``/``last_std`` [D] and ``inter_mean``/``inter_std`` [L, D] (``layers``
    order). Videos are merged with Chan's pairwise update rather than summing squares: these
    features can be a large constant plus a small variation, which sums of squares would cancel.
    """
    from store import LAST

    moments = {key: None for key in (LAST, *layers)}
    for vid in videos:
        read = store.read(vid, layers=(LAST, *layers))
        for key in moments:
            values = np.asarray(read[key], np.float64).reshape(-1, read[key].shape[-1])
            moments[key] = _merge_moments(moments[key], (len(values), values.mean(0),
                                                         values.var(0) * len(values)))
    std = {key: np.maximum(np.sqrt(m2 / count), STD_FLOOR)
           for key, (count, _, m2) in moments.items()}
    dim = store.feature_dim
    per_layer = lambda values, empty: np.stack(values) if layers else empty  # noqa: E731
    return {"last_mean": moments[LAST][1], "last_std": std[LAST],
            "inter_mean": per_layer([moments[i][1] for i in layers], np.zeros((0, dim))),
            "inter_std": per_layer([std[i] for i in layers], np.ones((0, dim)))}


def _merge_moments(a, b):
    """(count, mean, sum of squared deviations) of two parts combined."""
    if a is None:
        return b
    (na, mean_a, m2_a), (nb, mean_b, m2_b) = a, b
    count = na + nb
    delta = mean_b - mean_a
    return count, mean_a + delta * nb / count, m2_a + m2_b + delta ** 2 * na * nb / count


# ---------------------------------------------------------------------------------------------
# Batching.

def collate(samples) -> dict:
    """Pad samples to the longest one, with a validity mask (True = a real feature step)."""
    length = max(s["last"].shape[0] for s in samples)
    batch_size = len(samples)
    last = samples[0]["last"].new_zeros((batch_size, length, samples[0]["last"].shape[1]))
    mask = torch.zeros(batch_size, length, dtype=torch.bool)
    inter = None
    if samples[0]["inter"] is not None:
        layers, _, tokens, dim = samples[0]["inter"].shape
        inter = last.new_zeros((batch_size, layers, length, tokens, dim))
    for i, sample in enumerate(samples):
        steps = sample["last"].shape[0]
        last[i, :steps] = sample["last"]
        mask[i, :steps] = True
        if inter is not None:
            inter[i, :, :steps] = sample["inter"]
    return {
        "last": last,
        "inter": inter,
        "mask": mask,
        "targets": [{"segments": s["segments"], "labels": s["labels"]} for s in samples],
        "samples": [{k: s[k] for k in ("video", "step_offset", "step_scale")} for s in samples],
    }


def batch_to(batch: dict, device, low_precision: bool = False) -> dict:
    """The batch on ``device``; with ``low_precision`` the intermediate layers travel in bf16.

    ``inter`` is by far the largest tensor (L x K times the last layer) and autocast would
    compute with it in bf16 anyway, so casting it first halves its memory on the GPU.
    """
    moved = dict(batch)
    moved["last"] = batch["last"].to(device, non_blocking=True)
    moved["mask"] = batch["mask"].to(device, non_blocking=True)
    if batch["inter"] is not None:
        dtype = torch.bfloat16 if low_precision else batch["inter"].dtype
        moved["inter"] = batch["inter"].to(device, dtype=dtype, non_blocking=True)
    moved["targets"] = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]
    return moved


# ---------------------------------------------------------------------------------------------
# Does the store hold what the config needs?

def needed_layers(config, store, store_path) -> list:
    """Intermediate layers the model reads; refuses a store that lacks any of them."""
    if config.model.type == "head_only":
        return []
    stored = list(store.layers)
    needed = stored if config.model.layers is None else list(config.model.layers)
    if not needed:
        raise input_error(store_path, "holds no intermediate layers, which LoSA needs "
                          "(extract some, or train with --model head_only)")
    missing = [layer for layer in needed if layer not in stored]
    if missing:
        raise input_error(store_path, f"lacks intermediate layers {missing} that the config "
                          f"needs (model.layers); it holds {stored}")
    tokens = config.model.tokens
    if tokens is not None and list(store.tokens) != list(tokens):
        raise input_error(store_path, f"holds a pooled token grid {list(store.tokens)}, the "
                          f"config needs {list(tokens)} (model.tokens)")
    return needed
