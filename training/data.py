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

import functools
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from head.targets import pack_targets
from losa_tal import input_error
from store.verify import video_length

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
    outside: int = 0  # annotated segments dropped: wholly outside the feature steps


def video_truth(annotation, times, class_index: dict) -> VideoTruth:
    """Map one video's annotated segments (seconds) onto the grid of its ``times``."""
    num_steps = len(times)
    known = [i for i, label in enumerate(annotation.labels) if label in class_index]
    seconds = np.asarray(annotation.segments, np.float64).reshape(-1, 2)[known]
    steps = np.clip(seconds_to_steps(seconds, times), 0, num_steps - 1).reshape(-1, 2)
    labels = np.array([class_index[annotation.labels[i]] for i in known], np.int64)
    keep = steps[:, 1] > steps[:, 0]  # drops segments wholly outside the features
    return VideoTruth(num_steps, steps[keep], labels[keep], int((~keep).sum()))


# An annotated duration this far from the store's (a share of the latter, beyond one clip and
# one stride) is another video or another clock: an fps mix-up doubles every time.
DURATION_TOLERANCE = 0.15


def warn_annotation_mismatches(name: str, subset: str, annotated: dict, times: dict,
                               lengths: dict, truth: dict) -> None:
    """One warning line each, with counts, when the annotations of the videos in ``truth`` do not
    fit the store: segments outside the features (not trained on) or annotated durations that
    disagree with ``lengths``, the seconds the features cover (``store.verify.video_length``)."""
    outside = {vid: t.outside for vid, t in truth.items() if t.outside}
    if outside:
        total = sum(len(annotated[vid].labels) for vid in truth)
        first = min(outside)
        warnings.warn(f"{name}: {sum(outside.values())} of {total} '{subset}' segments, in "
                      f"{len(outside)} of {len(truth)} videos, lie outside their video's features "
                      f"and are not trained on (e.g. {outside[first]} in '{first}', whose "
                      f"features end at {times[first][-1]:.2f} s); are these the store's "
                      "annotations?", stacklevel=3)
    ratios = {}
    for vid in truth:
        stored, given = lengths[vid], annotated[vid].duration
        slack = 2 * times[vid][0] + (times[vid][1] - times[vid][0] if len(times[vid]) > 1 else 0)
        if given is not None and abs(given - stored) > DURATION_TOLERANCE * stored + slack:
            ratios[vid] = given / stored
    if ratios:
        first = min(ratios)
        warnings.warn(f"{name}: {len(ratios)} of {len(truth)} '{subset}' videos have an annotated "
                      f"duration more than {DURATION_TOLERANCE:.0%} off what the store's features "
                      f"cover (median ratio {float(np.median(list(ratios.values()))):.2f}; e.g. "
                      f"'{first}': {annotated[first].duration:.2f} s annotated, "
                      f"{lengths[first]:.2f} s of features); an fps mix-up "
                      "scales every time", stacklevel=3)


# ---------------------------------------------------------------------------------------------
# The dataset.

class StoreDataset(torch.utils.data.Dataset):
    """Samples of the annotated videos of one subset that the store holds.

    ``train=True`` gives one random sample per video per epoch (call :meth:`set_epoch`, or
    index with ``(epoch, index)``, which reaches persistent DataLoader workers too);
    ``train=False`` gives every inference piece of every video, in a fixed order.

    Features keep the store's dtype (float16) until the device converts them (:func:`batch_to`).
    With ``cache`` set (``training/cache.py``) they come from memory instead of the store.
    """

    def __init__(self, store, annotations, subset: str, classes, layers, data_config,
                 train: bool, seed: int = 0, max_videos: int | None = None):
        self.store = store
        self.subset = subset
        self.layers = list(layers)  # intermediate layers read; empty for head-only
        self.config = data_config
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.cache = None  # {video: (last, inter)} from training.cache.build_cache
        wanted = annotations.videos(subset)
        index = {name: i for i, name in enumerate(classes)}
        self.class_index = {label: index[head_label(label, data_config)]
                            for label in annotations.classes
                            if head_label(label, data_config) in index}
        committed = set(store.videos())  # one listing, not one request per video
        present = [vid for vid in sorted(wanted) if vid in committed]
        if not present:
            raise input_error(store.path, f"holds none of the {len(wanted)} '{subset}' videos "
                              f"of {annotations.name}")
        if len(present) < len(wanted):
            warnings.warn(f"{store.path}: {len(wanted) - len(present)} of {len(wanted)} "
                          f"'{subset}' videos in {annotations.name} are not in the store; "
                          "skipping them", stacklevel=2)
        if max_videos is not None:
            present = present[:max_videos]
        self.videos = present
        store.prefetch(present)  # their records, read at once rather than one by one
        self.times = {vid: np.asarray(store.feature_times(vid), np.float64) for vid in present}
        self.truth = {vid: video_truth(wanted[vid], self.times[vid], self.class_index)
                      for vid in present}
        protocol = store.meta["protocol"]
        lengths = {vid: video_length(protocol, store.video_info(vid), self.times[vid])
                   for vid in present}
        warn_annotation_mismatches(annotations.name, subset, wanted, self.times, lengths,
                                   self.truth)
        self.pieces = [] if train else [(vid, start, stop) for vid in present
                                        for start, stop in self._inference_pieces(vid)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return len(self.videos) if self.train else len(self.pieces)

    def __getitem__(self, index):
        if self.train:
            epoch, index = index if isinstance(index, tuple) else (self.epoch, index)
            vid = self.videos[index]
            rng = np.random.default_rng([self.seed, epoch, index])
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

    def _features(self, vid, start, stop):
        """last [t, D] and inter [L, t, K, D] (or None) in the stored dtype."""
        from store import LAST

        if self.cache is not None:  # views, no copy: collate copies them into the batch
            last, inter = self.cache[vid]
            return last[start:stop], None if inter is None else inter[:, start:stop]
        read = self.store.read(vid, layers=(LAST, *self.layers), start=start, stop=stop,
                               dtype=None)
        inter = torch.from_numpy(np.stack([read[i] for i in self.layers])) if self.layers else None
        return torch.from_numpy(read[LAST]), inter

    def _sample(self, vid, start, stop) -> dict:
        last, inter = self._features(vid, start, stop)
        truth = self.truth[vid]
        inside = _kept_inside(truth.segments, start, stop, self.config.min_action_inside)
        segments = np.clip(truth.segments[inside], start, stop) - start
        labels = truth.labels[inside]
        scale = 1.0
        if self.config.mode == "resize":  # resampled in float32, as the official loaders do
            last, inter, scale = _resample(last.float(), None if inter is None else inter.float(),
                                           self.config.resize_len)
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

def collate(samples, pin: bool = False, buffers: "HostBuffers | None" = None) -> dict:
    """Pad samples to the longest one, with a validity mask (True = a real feature step).

    Each feature byte is copied once, into the batch: in a DataLoader worker the batch is
    allocated in shared memory (so it is not copied again to reach the main process), with
    ``pin`` in page-locked memory (so the copy to the GPU is asynchronous), from ``buffers``
    when given, and next to the samples when they are on the GPU (a GPU cache). Only the
    padding is zeroed.
    """
    lengths = [s["last"].shape[0] for s in samples]
    length = max(lengths)
    first = samples[0]
    last = _batch_buffer((len(samples), length, first["last"].shape[1]),
                         _common_dtype(s["last"] for s in samples), first["last"].device, pin,
                         buffers)
    inter = None
    if first["inter"] is not None:
        layers, _, tokens, dim = first["inter"].shape
        inter = _batch_buffer((len(samples), layers, length, tokens, dim),
                              _common_dtype(s["inter"] for s in samples), first["inter"].device,
                              pin, buffers)
    # Next to the features and filled in place: a mask made on the host would reach a GPU
    # cache's batch by a copy that waits for the device.
    mask = torch.zeros(len(samples), length, dtype=torch.bool, device=last.device,
                       pin_memory=pin and last.device.type == "cpu")
    for i, (sample, steps) in enumerate(zip(samples, lengths)):
        mask[i, :steps] = True
        last[i, :steps] = sample["last"]
        last[i, steps:] = 0
        if inter is not None:
            inter[i, :, :steps] = sample["inter"]
            inter[i, :, steps:] = 0
    return {
        "last": last,
        "inter": inter,
        "mask": mask,
        "targets": _targets(samples, pin),
        "samples": [{k: s[k] for k in ("video", "step_offset", "step_scale")} for s in samples],
    }


def _targets(samples, pin: bool):
    """The samples' ground truth as one padded ``head.targets.Targets`` (two small tensors that
    reach the device without making the host wait; see :func:`batch_to`)."""
    targets = pack_targets([{"segments": s["segments"], "labels": s["labels"]} for s in samples])
    return targets.pin_memory() if pin else targets


class EpochBatches:
    """A batch sampler whose micro-batches of ``(epoch, index)`` keys the trainer replaces at
    the start of each epoch, so that one DataLoader (and its workers) serves the whole run."""

    def __init__(self, batches=()):
        self.batches = list(batches)

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def training_loader(dataset, batches: EpochBatches, device, cache_kind: str):
    """The training DataLoader: persistent workers reading the store, pinned batches on CUDA.

    From a cache there is nothing for workers to do but a memcpy, which would then be copied
    again to reach this process, so this process collates, straight into pinned memory on
    CUDA (into GPU memory from a GPU cache).
    """
    cuda = torch.device(device).type == "cuda"
    workers = 0 if dataset.cache is not None else dataset.config.num_workers
    pin_in_collate = cuda and workers == 0 and cache_kind != "gpu"
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=workers,
        collate_fn=functools.partial(collate, pin=pin_in_collate, buffers=HostBuffers()),
        pin_memory=cuda and workers > 0, persistent_workers=workers > 0)


def _common_dtype(tensors) -> torch.dtype:
    """float16, or float32 when any sample holds a layer the store promoted on overflow."""
    dtypes = {t.dtype for t in tensors}
    return torch.float32 if torch.float32 in dtypes else dtypes.pop()


def _batch_buffer(shape, dtype, device, pin: bool, buffers=None) -> torch.Tensor:
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    if torch.utils.data.get_worker_info() is not None:
        storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
        return torch.empty(0, dtype=dtype).set_(storage).view(shape)
    if buffers is not None and not pin:
        return buffers.take(shape, dtype)
    return torch.empty(shape, dtype=dtype, pin_memory=pin)


class HostBuffers:
    """Batch buffers in ordinary host memory that are reused once nothing refers to them.

    A fresh 200 MB tensor per batch costs page faults (the kernel maps and zeroes every page)
    that take longer than the copy into it. Pinned memory needs no such pool (PyTorch's caching
    host allocator reuses it, and knows about copies still in flight), nor do workers (their
    batches travel in shared memory). A buffer is free when its storage has no user but this
    pool: every tensor viewing it (a batch, a slice of one) holds a use.
    """

    def __init__(self, limit: int = 4):
        self.limit = limit  # buffers kept; beyond it a batch gets a fresh tensor
        self.pool: list[torch.Tensor] = []  # flat uint8 buffers

    def take(self, shape, dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        for buffer in self.pool:
            # Uses: this pool's tensor and the storage object made to ask.
            if buffer.numel() >= nbytes and \
                    torch._C._storage_Use_Count(buffer.untyped_storage()._cdata) == 2:
                return buffer[:nbytes].view(dtype).view(shape)
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        if len(self.pool) < self.limit:
            self.pool.append(buffer)
        elif self.pool:  # keep the larger buffers: windows are mostly full length
            smallest = min(range(len(self.pool)), key=lambda i: self.pool[i].numel())
            if self.pool[smallest].numel() < nbytes:
                self.pool[smallest] = buffer
        return buffer.view(dtype).view(shape)


def batch_to(batch: dict, device, low_precision: bool = False) -> dict:
    """The batch on ``device`` in the model's dtypes, converted there (float16 crosses PCIe).

    ``last`` becomes float32; ``inter``, by far the largest tensor (L x K times the last
    layer), becomes bf16 with ``low_precision`` (autocast would compute with it in bf16 anyway,
    and it halves its memory on the GPU), else float32. The targets become one padded
    ``Targets`` (a list of per-video dicts is packed), copied without waiting for the device.
    """
    moved = dict(batch)
    moved["last"] = batch["last"].to(device, non_blocking=True).float()
    moved["mask"] = batch["mask"].to(device, non_blocking=True)
    if batch["inter"] is not None:
        dtype = torch.bfloat16 if low_precision else torch.float32
        moved["inter"] = batch["inter"].to(device, non_blocking=True).to(dtype)
    moved["targets"] = pack_targets(batch["targets"]).to(device)
    return moved


# ---------------------------------------------------------------------------------------------
# Does the store hold what the config needs?

def needed_layers(config, store) -> list:
    """Intermediate layers the model reads; refuses a store that lacks any of them."""
    if config.model.type == "head_only":
        return []
    stored = list(store.layers)
    needed = stored if config.model.layers is None else list(config.model.layers)
    if not needed:
        raise input_error(store.path, "holds no intermediate layers, which LoSA needs "
                          "(extract some, or train with `model.type` head_only)")
    missing = [layer for layer in needed if layer not in stored]
    if missing:
        raise input_error(store.path, f"lacks intermediate layers {missing} that the config "
                          f"needs (model.layers); it holds {stored}")
    tokens = config.model.tokens
    if tokens is not None and list(store.tokens) != list(tokens):
        raise input_error(store.path, f"holds a pooled token grid {list(store.tokens)}, the "
                          f"config needs {list(tokens)} (model.tokens)")
    return needed
