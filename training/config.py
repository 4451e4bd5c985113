"""Training configs: plain JSON files with one section per concern, checked against dataclasses.

A config file holds the sections ``data``, ``model`` (with its ``losa`` sub-section), ``head``,
``optim``, ``train`` and ``eval``. Keys left out take the defaults below; a key that is not listed
here, or a value of the wrong type, is an ``InputError`` naming the file and the dotted key, so a
typo never trains silently with a default. ``--set key.sub=value`` overrides are parsed as JSON
literals (``--set optim.lr_head=2e-4``, ``--set model.layers=[3,7]``); a value that is not valid
JSON is taken as a string (``--set model.type=head_only``).

The defaults are ActionFormer's THUMOS-14 settings (DESIGN.md section 4).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from losa_tal import (apply_overrides, build_config, input_error, parse_override,  # noqa: F401
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


@dataclass
class LosaConfig:
    """Constructor arguments of ``adapt.LoSA`` other than the shapes read from the store."""

    bottleneck: int = 256
    num_heads: int = 4
    short_window: int = 9  # clips around each clip that its short-range adapter attends to
    long_window: int | None = None  # None: global attention over the window/video
    dropout: float = 0.1
    checkpoint_layers: bool = False  # recompute adapter activations in backward (saves memory)
    zero_init: str = "fuse"  # "fuse" or "gates": which side of the fusion starts at zero
    adapters: str = "both"  # "both" (LoSA), "short" or "long": one range only, for ablations
    long_relative_bias: bool = False  # learned per-offset bias in the long-range band


@dataclass
class ModelConfig:
    type: str = "losa"  # "losa" (adapters + head) or "head_only" (the baseline, last layer only)
    layers: list[int] | None = None  # intermediate layers LoSA adapts; None: all in the store
    tokens: list[int] | None = None  # pooled token grid [t, h, w] the store must hold; None: any
    losa: LosaConfig = field(default_factory=LosaConfig)


@dataclass
class HeadConfig:
    """Constructor arguments of ``head.ActionFormerHead`` other than in_dim and num_classes."""

    embed_dim: int = 512
    num_levels: int = 6  # pyramid levels, strides 1, 2, ..., 2**(num_levels - 1)
    # Local self-attention window in steps of each level, or one per level; -1 = global.
    window: int | list[int] = 19
    num_heads: int = 4
    max_seq_len: int = 2304  # length of the position table (used only with use_abs_pe)
    num_embed_convs: int = 2
    num_stem_blocks: int = 2
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    drop_path: float = 0.1
    tower_depth: int = 2
    use_abs_pe: bool = False
    # Level l regresses segments whose farther end lies within [bounds[l], bounds[l + 1]) steps
    # (the top level without limit); None: the head's THUMOS ranges 0, 4, 8, 16, 32, 64.
    regression_bounds: list[float] | None = None
    center_sample_radius: float | None = 1.5
    cls_prior_prob: float = 0.01
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    reg_loss_weight: float = 1.0
    label_smoothing: float = 0.0
    loss_norm_init: float = 100.0
    loss_norm_momentum: float = 0.9


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


@dataclass
class TrainConfig:
    epochs: int = 35
    batch_size: int = 2  # global batch: the same whatever the number of processes
    micro_batch: int = 2  # videos per forward pass; the rest is gradient accumulation
    seed: int = 0
    amp: bool = True  # bf16 autocast on CUDA (CPU always runs in float32)
    # The loss normaliser's EMA takes the global batch's positive count "before" the losses are
    # divided by it (ActionFormer), or "after" the step (saves a collective per step).
    normalizer_update: str = "before"


@dataclass
class EvalConfig:
    subset: str | None = None  # held-out subset scored in training; None: the file's test split
    every: int = 5  # evaluate every N epochs (and after the last); 0: only after the last
    max_videos: int | None = None  # evaluate on the first N videos only, to save time
    tiou_thresholds: list[float] = field(default_factory=lambda: [0.3, 0.4, 0.5, 0.6, 0.7])
    score_threshold: float = 0.001
    pre_nms_topk: int = 2000  # candidates kept per pyramid level before NMS
    min_duration: float = 0.05  # shortest candidate kept, in feature steps
    max_segments: int = 200  # per video, after NMS (ActionFormer's THUMOS setting)
    nms: str = "soft"  # "soft" (Gaussian Soft-NMS), "linear" or "hard"
    nms_sigma: float = 0.5
    iou_threshold: float = 0.1  # hard and linear NMS only
    # Refine kept segments by score x IoU voting among candidates overlapping by this IoU.
    # ActionFormer votes only after class-agnostic NMS (ActivityNet, 0.9); None: no voting.
    voting_iou: float | None = None


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw, source: str = "config") -> "Config":
        """Build a config from plain data, checking every key and type against the dataclasses."""
        config = build_config(cls, raw, source)
        _check_values(config, source)
        return config


def load_config(path, overrides=()) -> Config:
    """Read a JSON config file and apply ``key.sub=value`` overrides on top of it."""
    raw = apply_overrides(read_config_file(path), overrides)
    return Config.from_dict(raw, source=str(path))


def _finite_and_at_least(value: float, low: float) -> bool:
    return math.isfinite(value) and value >= low


def _check_values(config: Config, source: str) -> None:
    """Range and choice checks that types alone cannot express."""
    checks = [
        ("model.type", config.model.type in MODEL_TYPES, f"one of {', '.join(MODEL_TYPES)}"),
        ("data.mode", config.data.mode in DATA_MODES, f"one of {', '.join(DATA_MODES)}"),
        ("data.max_seq_len", config.data.max_seq_len > 0, "positive"),
        ("data.resize_len", config.data.resize_len > 0, "positive"),
        ("data.min_action_inside", 0 < config.data.min_action_inside <= 1, "in (0, 1]"),
        ("data.infer_overlap", 0 <= config.data.infer_overlap < 1, "in [0, 1)"),
        ("data.infer_window", config.data.infer_window is None or config.data.infer_window > 0,
         "positive or null"),
        ("data.num_workers", config.data.num_workers >= 0, "zero or more"),
        ("data.crop_ratio", config.data.crop_ratio is None or (
            len(config.data.crop_ratio) == 2
            and 0 < config.data.crop_ratio[0] <= config.data.crop_ratio[1] <= 1),
         "null or [low, high] with 0 < low <= high <= 1"),
        ("data.window_tries", config.data.window_tries > 0, "positive"),
        ("train.normalizer_update", config.train.normalizer_update in ("before", "after"),
         "before or after"),
        ("data.cache", config.data.cache in CACHE_KINDS, f"one of {', '.join(CACHE_KINDS)}"),
        ("head.regression_bounds", config.head.regression_bounds is None
         or len(config.head.regression_bounds) == config.head.num_levels,
         "null or one lower bound per level (head.num_levels)"),
        ("model.tokens", config.model.tokens is None or len(config.model.tokens) == 3,
         "a list [t, h, w]"),
        ("model.layers", config.model.layers is None
         or len(set(config.model.layers)) == len(config.model.layers),
         "null or a list of distinct layers (two adapters on one block is a typo)"),
        ("train.epochs", config.train.epochs > 0, "positive"),
        ("train.batch_size", config.train.batch_size > 0, "positive"),
        ("train.micro_batch", config.train.micro_batch > 0
         and config.train.batch_size % config.train.micro_batch == 0,
         "positive and a divisor of train.batch_size"),
        ("optim.ema_decay", 0 <= config.optim.ema_decay < 1, "in [0, 1)"),
        *((f"optim.{name}", _finite_and_at_least(getattr(config.optim, name), 0),
           "finite and zero or more")
          for name in ("lr_head", "lr_adapter", "weight_decay", "warmup_epochs", "clip_grad",
                       "min_lr")),
        ("eval.every", config.eval.every >= 0, "zero or more"),
        ("eval.max_videos", config.eval.max_videos is None or config.eval.max_videos > 0,
         "positive or null"),
        ("eval.pre_nms_topk", config.eval.pre_nms_topk > 0, "positive"),
        ("eval.max_segments", config.eval.max_segments > 0, "positive"),
        ("eval.nms", config.eval.nms in ("soft", "linear", "hard"), "soft, linear or hard"),
        ("eval.tiou_thresholds", bool(config.eval.tiou_thresholds)
         and all(0 < t < 1 for t in config.eval.tiou_thresholds), "a non-empty list in (0, 1)"),
        ("eval.score_threshold", 0 <= config.eval.score_threshold <= 1, "in [0, 1]"),
        ("eval.min_duration", _finite_and_at_least(config.eval.min_duration, 0),
         "finite and zero or more"),
        ("eval.nms_sigma", _finite_and_at_least(config.eval.nms_sigma, 0)
         and config.eval.nms_sigma > 0, "finite and positive"),
        ("eval.iou_threshold", 0 <= config.eval.iou_threshold <= 1, "in [0, 1]"),
        ("eval.voting_iou", config.eval.voting_iou is None or 0 <= config.eval.voting_iou <= 1,
         "in [0, 1] or null"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise input_error(source, f"{key}: must be {expected}")
    from training.detector import constructor_problem

    problem = constructor_problem(config.model, config.head)
    if problem:
        raise input_error(source, problem)
