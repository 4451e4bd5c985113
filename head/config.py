"""The head's settings: the one place their defaults and ranges live (torch-free).

``HeadConfig`` holds ``ActionFormerHead``'s constructor arguments (other than the input width and
the class count) and ``PostprocessConfig`` the options of ``ActionFormerHead.predict``, under
the same names. Both defaults are ActionFormer's THUMOS-14 settings; the constructor, the
post-processing functions and the training config take theirs from here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from losa_tal import check_positive_integers, check_values, finite_and_at_least

GLOBAL_WINDOW = -1  # a level's ``window`` that means: attend to the whole sequence
# A config asking for more pyramid levels, embedding convs, stem blocks or tower layers than this
# is a typo: a billion blocks would take hours to build, and strides reach 2**63 at 64 levels.
MAX_REPEATED_LAYERS = 64
NMS_METHODS = ("soft", "linear", "hard")  # "none" (rank only) is a post-processing choice too
# Per pyramid level, the (low, high) range of a point's larger distance to a segment's ends,
# in input feature steps; the top level has no upper limit (written null in JSON).
THUMOS_REGRESSION_RANGES = ((0, 4), (4, 8), (8, 16), (16, 32), (32, 64), (64, math.inf))


def open_ranges(ranges) -> list:
    """Regression ranges with ``null`` (None) or ``inf`` as "no upper limit" -> float pairs."""
    return [(float(low), math.inf if high is None else float(high)) for low, high in ranges]


def json_ranges(ranges) -> list:
    """Regression ranges as JSON-friendly [low, high] lists, None for "no upper limit"."""
    return [[low, None if high == math.inf else high] for low, high in ranges]


def level_windows(window, num_levels: int) -> list:
    """One attention window per pyramid level from an int (all levels) or a list."""
    return [window] * num_levels if isinstance(window, int) else list(window)


def padding_factor(windows) -> int:
    """What every padded length is a multiple of: for each level, stride x (window // 2) x 2
    (the stride alone for a global level), the largest over levels."""
    return max(2 ** level * (w // 2 * 2 if w != GLOBAL_WINDOW else 1)
               for level, w in enumerate(windows))


@dataclass
class HeadConfig:
    """``ActionFormerHead`` constructor arguments other than in_dim and num_classes (their
    meaning: the class docstring in head/model.py)."""

    embed_dim: int = 512
    num_levels: int = 6  # pyramid levels, strides 1, 2, ..., 2**(num_levels - 1)
    window: int | list[int] = 19  # odd local window per level (or one for all); -1: global
    num_heads: int = 4
    max_seq_len: int = 2304
    num_embed_convs: int = 2
    num_stem_blocks: int = 2
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    drop_path: float = 0.1
    tower_depth: int = 2
    use_abs_pe: bool = False
    regression_ranges: list[list[float | None]] = field(
        default_factory=lambda: json_ranges(THUMOS_REGRESSION_RANGES))
    center_sample_radius: float | None = 1.5
    cls_prior_prob: float = 0.01
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    reg_loss_weight: float = 1.0
    label_smoothing: float = 0.0
    loss_norm_init: float = 100.0
    loss_norm_momentum: float = 0.9

    def check(self) -> None:
        """ConfigError naming the first argument outside its range: a zero head count, a
        negative width or a NaN rate is refused here, not inside torch or as a ``nan`` loss."""
        finite = math.isfinite
        check_positive_integers(embed_dim=self.embed_dim, num_levels=self.num_levels,
                                num_heads=self.num_heads, max_seq_len=self.max_seq_len,
                                num_embed_convs=self.num_embed_convs)
        check_values((name, getattr(self, name) <= MAX_REPEATED_LAYERS,
                      f"at most {MAX_REPEATED_LAYERS}", getattr(self, name))
                     for name in ("num_levels", "num_embed_convs", "num_stem_blocks",
                                  "tower_depth"))
        windows = level_windows(self.window, self.num_levels)
        radius = self.center_sample_radius
        check_values([
            *((name, getattr(self, name) >= 0, "zero or more", getattr(self, name))
              for name in ("num_stem_blocks", "tower_depth")),
            ("embed_dim", self.embed_dim % self.num_heads == 0,
             f"divisible by num_heads {self.num_heads}", self.embed_dim),
            ("embed_dim", not self.use_abs_pe or self.embed_dim % 2 == 0,
             "even with use_abs_pe (sine and cosine pairs)", self.embed_dim),
            ("window", len(windows) == self.num_levels and all(
                w == GLOBAL_WINDOW or (w >= 3 and w % 2 == 1) for w in windows),
             f"odd and at least 3, or {GLOBAL_WINDOW} (global), one or one per level",
             self.window),
            ("mlp_ratio", finite(self.mlp_ratio) and self.embed_dim * self.mlp_ratio >= 1,
             "a finite ratio giving at least one hidden unit", self.mlp_ratio),
            *((name, 0 <= getattr(self, name) < 1, "in [0, 1)", getattr(self, name))
              for name in ("dropout", "drop_path", "label_smoothing")),
            ("cls_prior_prob", 0 < self.cls_prior_prob < 1, "in (0, 1)", self.cls_prior_prob),
            ("focal_alpha", self.focal_alpha <= 1 and finite(self.focal_alpha),
             "at most 1 (negative disables it)", self.focal_alpha),
            *((name, finite_and_at_least(getattr(self, name), 0), "finite and zero or more",
               getattr(self, name))
              for name in ("focal_gamma", "reg_loss_weight")),
            ("loss_norm_init", 0 < self.loss_norm_init and finite(self.loss_norm_init),
             "finite and positive", self.loss_norm_init),
            ("loss_norm_momentum", 0 <= self.loss_norm_momentum <= 1, "in [0, 1]",
             self.loss_norm_momentum),
            ("center_sample_radius", radius is None or (0 < radius and finite(radius)),
             "finite and positive, or null", radius),
        ])
        factor = padding_factor(windows)
        check_values([
            ("max_seq_len", self.max_seq_len % factor == 0, f"a multiple of {factor} (largest "
             "stride x window // 2 x 2)", self.max_seq_len),
            ("regression_ranges", len(self.regression_ranges) == self.num_levels,
             f"one [low, high] pair per level ({self.num_levels})", self.regression_ranges),
        ])
        check_values([("regression_ranges", all(
            len(pair) == 2 and 0 <= pair[0] <= high  # False for NaN bounds
            for pair in self.regression_ranges for high in [math.inf if pair[1] is None
                                                            else pair[1]]),
            "[low, high] pairs with 0 <= low <= high (high null: no limit)",
            self.regression_ranges)])


def head_parameter_count(config: HeadConfig, in_dim: int, num_classes: int) -> int:
    """Parameters and buffers of ``ActionFormerHead(in_dim, num_classes, **config)``, worked
    out from its layer shapes without building it (tests/test_head.py checks it)."""
    dim, levels = config.embed_dim, config.num_levels
    hidden = int(dim * config.mlp_ratio)
    norm = 2 * dim
    embed = 3 * in_dim * dim + (config.num_embed_convs - 1) * 3 * dim * dim \
        + config.num_embed_convs * norm
    attention = 3 * (3 * dim + norm + dim * dim + dim) + dim * dim + dim
    block = 2 * norm + attention + 2 * dim * hidden + hidden + dim \
        + (2 * dim if config.drop_path > 0 else 0)
    towers = 2 * config.tower_depth * (3 * dim * dim + norm) + 3 * dim * (num_classes + 2) \
        + num_classes + 2
    buffers = 1 + (config.max_seq_len * dim if config.use_abs_pe else 0)
    return (embed + (config.num_stem_blocks + levels - 1) * block + levels * norm + towers
            + levels + buffers)


@dataclass
class PostprocessConfig:
    """Options of ``ActionFormerHead.predict`` (``head.postprocess.postprocess``); the NMS
    functions of head/nms.py take their defaults from here too."""

    score_threshold: float = 0.001  # candidates must score above this
    pre_nms_top_k: int = 2000  # candidates kept per pyramid level before NMS
    min_duration: float = 0.05  # shortest candidate kept, in feature steps
    nms_method: str = "soft"  # "soft" (Gaussian Soft-NMS), "linear", "hard" or "none"
    iou_threshold: float = 0.1  # hard and linear NMS only
    sigma: float = 0.5  # Gaussian Soft-NMS: scores decay by exp(-IoU**2 / sigma)
    min_score: float = 0.001  # a detection whose decayed score falls below this is dropped
    max_segments: int = 200  # per video, after NMS
    # Refine kept segments by score x IoU voting among candidates overlapping by this IoU.
    # ActionFormer votes only after class-agnostic NMS (ActivityNet, 0.9); None: no voting.
    voting_iou: float | None = None

    def check(self) -> None:
        methods = (*NMS_METHODS, "none")
        check_positive_integers(pre_nms_top_k=self.pre_nms_top_k,
                                max_segments=self.max_segments)
        check_values([
            *((name, 0 <= getattr(self, name) <= 1, "in [0, 1]", getattr(self, name))
              for name in ("score_threshold", "iou_threshold", "min_score")),
            ("min_duration", finite_and_at_least(self.min_duration, 0), "finite and zero or more",
             self.min_duration),
            ("nms_method", self.nms_method in methods, f"one of {', '.join(methods)}",
             self.nms_method),
            ("sigma", 0 < self.sigma and math.isfinite(self.sigma), "finite and positive",
             self.sigma),
            ("voting_iou", self.voting_iou is None or 0 <= self.voting_iou <= 1,
             "in [0, 1] or null", self.voting_iou),
        ])
