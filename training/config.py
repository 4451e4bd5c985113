"""Training configs: plain JSON files with one section per concern, checked against dataclasses.

A config file holds a one-line ``description`` and the sections ``data``, ``model`` (with its
``losa`` sub-section: ``adapt.LosaConfig``), ``head`` (``head.HeadConfig``), ``postprocess``
(``head.PostprocessConfig``), ``optim``, ``train`` and ``eval``. Each component's dataclass is the
one place its defaults and ranges live; keys left out take them. A key that is not listed, a
value of the wrong type or out of range is an ``InputError`` naming the file and the dotted key,
so a typo never trains silently with a default. Nothing here imports torch: a bad config is
refused before any model code loads. ``--set key.sub=value`` overrides are parsed as JSON
literals (``--set optim.lr_head=2e-4``, ``--set model.layers=[3,7]``); a value that is not valid
JSON is taken as a string (``--set model.type=head_only``).

Keys renamed since (``RENAMED`` below) still load, so older config files and checkpoints do.
The defaults are ActionFormer's THUMOS-14 settings.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from adapt.config import LosaConfig, losa_parameter_count
from head.config import HeadConfig, PostprocessConfig, head_parameter_count
from losa_distributed import DEFAULT_TIMEOUT_MINUTES
from losa_tal import (ConfigError, apply_overrides, build_config, check_positive_integers,
                      check_values, config_arguments, finite_and_at_least, input_error,
                      read_config_file)

MODEL_TYPES = ("losa", "head_only")
CACHE_KINDS = ("auto", "none", "ram", "pinned", "gpu")
DATA_MODES = ("window", "resize")


@dataclass
class DataConfig:
    dataset: str = "thumos"  # the extraction preset that builds the store (named in errors)
    store: str = "stores/thumos_vitg"  # default paths; --store/--annotations override them
    annotations: str = "data/thumos14/annotations/thumos14.json"
    train_subset: str | None = None  # None: the annotation file's training split by convention
    mode: str = "window"  # "window": THUMOS-style crops; "resize": ActivityNet fixed length
    max_seq_len: int = 2304  # window mode: longest training window, in feature steps
    min_action_inside: float = 0.5  # window mode: actions cut below this fraction are dropped
    resize_len: int = 192  # resize mode: every video is resampled to this many steps
    infer_window: int | None = None  # window mode: None runs each video whole at inference
    infer_overlap: float = 0.25  # fraction shared by consecutive inference windows
    num_workers: int = 0  # DataLoader worker processes (persistent; unused with a cache)
    # Where a copy of the training split's features lives: "auto" (the first of gpu, pinned,
    # ram that it fits in, else none), "gpu", "pinned", "ram" or "none" (training/cache.py).
    cache: str = "auto"
    # Window mode: a video no longer than max_seq_len is cropped to a random length in
    # [crop_ratio[0], crop_ratio[1]] of its own (ActionFormer's jitter); null: used whole.
    crop_ratio: list[float] | None = field(default_factory=lambda: [0.9, 1.0])
    window_tries: int = 200  # random crops tried until one keeps an action
    # Standardise every feature channel (last layer and each intermediate layer) with the mean
    # and std of the training videos, kept in the checkpoint. For backbones whose features are
    # a large constant plus a small variation (random or unfamiliar weights).
    standardise: bool = False
    # One class, "action", for every annotated label: the class-agnostic detector of the
    # ActivityNet protocol, whose detections `cli.py fuse` labels with video-level scores.
    class_agnostic: bool = False

    def check(self) -> None:
        crop = self.crop_ratio
        check_positive_integers(max_seq_len=self.max_seq_len, resize_len=self.resize_len,
                                window_tries=self.window_tries)
        check_values([
            ("mode", self.mode in DATA_MODES, f"one of {', '.join(DATA_MODES)}", self.mode),
            ("min_action_inside", 0 < self.min_action_inside <= 1, "in (0, 1]",
             self.min_action_inside),
            ("infer_overlap", 0 <= self.infer_overlap < 1, "in [0, 1)", self.infer_overlap),
            ("infer_window", self.infer_window is None or self.infer_window > 0,
             "positive or null", self.infer_window),
            ("num_workers", self.num_workers >= 0, "zero or more", self.num_workers),
            ("crop_ratio", crop is None or (len(crop) == 2 and 0 < crop[0] <= crop[1] <= 1),
             "null or [low, high] with 0 < low <= high <= 1", crop),
            ("cache", self.cache in CACHE_KINDS, f"one of {', '.join(CACHE_KINDS)}", self.cache),
        ])


@dataclass
class ModelConfig:
    type: str = "losa"  # "losa" (adapters + head) or "head_only" (the baseline, last layer only)
    layers: list[int] | None = None  # intermediate layers LoSA adapts; None: all in the store
    tokens: list[int] | None = None  # pooled token grid [t, h, w] the store must hold; None: any
    losa: LosaConfig = field(default_factory=LosaConfig)

    def check(self) -> None:
        check_values([
            ("type", self.type in MODEL_TYPES, f"one of {', '.join(MODEL_TYPES)}", self.type),
            ("layers", self.layers is None or len(set(self.layers)) == len(self.layers),
             "null or a list of distinct layers (two adapters on one block is a typo)",
             self.layers),
            ("tokens", self.tokens is None or len(self.tokens) == 3, "a list [t, h, w]",
             self.tokens),
        ])


@dataclass
class OptimConfig:
    lr_head: float = 1e-4
    lr_adapter: float = 1e-4
    weight_decay: float = 0.05
    # Stepped per iteration as in ActionFormer: linear warmup from lr 0, then a cosine down to
    # min_lr at the end of train.epochs (which counts the warmup epochs too).
    warmup_epochs: float = 5.0
    min_lr: float = 1e-8
    clip_grad: float = 1.0  # max global gradient norm; 0 disables clipping
    ema_decay: float = 0.999  # exponential moving average of the weights, used for evaluation

    def check(self) -> None:
        check_values([
            ("ema_decay", 0 <= self.ema_decay < 1, "in [0, 1)", self.ema_decay),
            *((name, finite_and_at_least(getattr(self, name), 0), "finite and zero or more",
               getattr(self, name))
              for name in ("lr_head", "lr_adapter", "weight_decay", "warmup_epochs",
                           "clip_grad", "min_lr")),
        ])


@dataclass
class TrainConfig:
    epochs: int = 35
    batch_size: int = 2  # global batch: the same whatever the number of processes
    # Videos per forward pass at most: each process takes its share of the global batch in
    # the largest micro-batches up to this that divide it; the rest is gradient accumulation.
    micro_batch: int = 2
    seed: int = 0
    amp: bool = True  # bf16 autocast on CUDA (CPU always runs in float32)
    # The loss normaliser's EMA takes the global batch's positive count "before" the losses are
    # divided by it (ActionFormer), or "after" the step (saves a collective per step).
    normalizer_update: str = "before"
    # Minutes a process waits for the others at a collective (NCCL's own default is 10; the
    # slow start-up, reading the store and building the cache, comes before the first one).
    timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES

    def check(self) -> None:
        check_positive_integers(epochs=self.epochs, batch_size=self.batch_size,
                                micro_batch=self.micro_batch)
        check_values([
            ("timeout_minutes", finite_and_at_least(self.timeout_minutes, 0)
             and self.timeout_minutes > 0, "positive", self.timeout_minutes),
            ("normalizer_update", self.normalizer_update in ("before", "after"),
             "before or after", self.normalizer_update),
        ])


@dataclass
class EvalConfig:
    """Evaluation during training; how detections are made is the ``postprocess`` section."""

    subset: str | None = None  # held-out subset scored in training; None: the file's test split
    every: int = 5  # evaluate every N epochs (and after the last); 0: only after the last
    max_videos: int | None = None  # evaluate on the first N videos only, to save time
    tiou_thresholds: list[float] = field(default_factory=lambda: [0.3, 0.4, 0.5, 0.6, 0.7])

    def check(self) -> None:
        check_values([
            ("every", self.every >= 0, "zero or more", self.every),
            ("max_videos", self.max_videos is None or self.max_videos > 0, "positive or null",
             self.max_videos),
            ("tiou_thresholds", bool(self.tiou_thresholds)
             and all(0 < t < 1 for t in self.tiou_thresholds), "a non-empty list in (0, 1)",
             self.tiou_thresholds),
        ])


# Models larger than this are refused before anything is built: a billion-wide layer cannot be
# allocated (repeated layers are bounded by head.config.MAX_REPEATED_LAYERS).
MAX_ELEMENTS = 2 ** 31  # parameters and buffers at the placeholder shapes below (8 GiB fp32)
PLACEHOLDER_SHAPES = {"in_dim": 8, "num_classes": 2, "num_layers": 1, "num_tokens": 1}


@dataclass
class Config:
    description: str = ""  # one line: what this recipe is for
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw, source: str = "config") -> "Config":
        """Build a config from plain data (keys renamed since included), checking every key,
        type and range against the dataclasses."""
        return build_config(cls, renamed_keys_updated(raw, source), source)

    def check(self) -> None:
        """The sizes of the models this config builds, at placeholder shapes (no torch)."""
        shapes = PLACEHOLDER_SHAPES
        counts = [("head", head_parameter_count(self.head, shapes["in_dim"],
                                                shapes["num_classes"]))]
        if self.model.type == "losa":
            counts.append(("model.losa", losa_parameter_count(
                shapes["in_dim"], shapes["num_layers"], shapes["num_tokens"],
                **config_arguments(self.model.losa))))
        for section, elements in counts:
            if elements > MAX_ELEMENTS:
                raise ConfigError(section, f"{elements:.3g} weights, more than the "
                                  f"{MAX_ELEMENTS:.3g} allowed")


def load_config(path, overrides=()) -> Config:
    """Read a JSON config file and apply ``key.sub=value`` overrides on top of it."""
    raw = apply_overrides(read_config_file(path), overrides)
    return Config.from_dict(raw, source=str(path))


def ranges_from_bounds(bounds):
    """The old ``head.regression_bounds`` (each level's lower bound; the top level open) as
    ``head.regression_ranges`` pairs. Anything but a list is passed on for the type check."""
    if not isinstance(bounds, list):
        return bounds
    return [[low, high] for low, high in zip(bounds, [*bounds[1:], None])]


# Keys renamed to the public API's names (ActionFormerHead's arguments and predict options):
# old dotted key -> (new dotted key, other keys the old one also set, value conversion).
# Config files and checkpoints written with the old keys load through this table.
RENAMED = {
    "eval.score_threshold": ("postprocess.score_threshold", ["postprocess.min_score"], None),
    "eval.pre_nms_topk": ("postprocess.pre_nms_top_k", [], None),
    "eval.min_duration": ("postprocess.min_duration", [], None),
    "eval.max_segments": ("postprocess.max_segments", [], None),
    "eval.nms": ("postprocess.nms_method", [], None),
    "eval.nms_sigma": ("postprocess.sigma", [], None),
    "eval.iou_threshold": ("postprocess.iou_threshold", [], None),
    "eval.voting_iou": ("postprocess.voting_iou", [], None),
    "head.regression_bounds": ("head.regression_ranges", [], ranges_from_bounds),
}


def renamed_keys_updated(raw, source: str):
    """A copy of plain config data with the keys of ``RENAMED`` under their new names (an old
    null ``regression_bounds`` meant the default ranges: dropped). Giving a key under both
    names is refused."""
    if not isinstance(raw, dict):
        return raw
    raw = {name: dict(value) if isinstance(value, dict) else value for name, value in raw.items()}
    for old, (new, also, convert) in RENAMED.items():
        section, key = old.split(".")
        if not isinstance(raw.get(section), dict) or key not in raw[section]:
            continue
        value = raw[section].pop(key)
        if convert is not None:
            if value is None:
                continue
            value = convert(value)
        for index, target in enumerate([new, *also]):
            target_section, target_key = target.split(".")
            values = raw.setdefault(target_section, {})
            if not isinstance(values, dict):
                break  # build_config names the section that is not an object
            if index == 0 and target_key in values:
                raise input_error(source, f"{old}: renamed {new}; give only {new}")
            values.setdefault(target_key, value)
    return raw
