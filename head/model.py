"""ActionFormer's anchor-free temporal action detector (Zhang et al., ECCV 2022), numerically
equal to the official code (happyharrycn/actionformer_release) for the same weights.

input [B, T, D] features + [B, T] mask
  -> embedding: masked convs + LayerNorm + ReLU
  -> stem: transformer blocks with local self-attention at stride 1
  -> branch: one strided transformer block per further pyramid level (strides 2, 4, ..., 32)
  -> per level LayerNorm, then classification and regression towers shared by all levels
     (their prediction convs and the offset scales run in float32 under autocast)
  -> per level: class logits [B, T_l, C], offsets [B, T_l, 2] (distances to start and end, in
     units of the level's stride), mask [B, T_l].
Every pyramid point predicts for every class independently (sigmoid); training assigns ground
truth to points by centre sampling and per-level regression ranges (head/targets.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from head.blocks import (ConvNormReLU, MaskedConv1d, Scale, TransformerBlock, downsample_mask,
                         zero_padding)
from head.config import (THUMOS_REGRESSION_RANGES, HeadConfig, level_windows, open_ranges,
                         padding_factor)
from head.losses import diou_loss, sigmoid_focal_loss
from head.postprocess import postprocess
from head.targets import assign_batch, make_points, pack_targets
from losa_tal import check_positive_integers, checked_config, config_arguments

DEFAULT = HeadConfig()  # the constructor's defaults (written once, in head/config.py)


class Tower(nn.Module):
    """Shared per-level prediction tower: (conv, LayerNorm, ReLU) x depth, then a conv."""

    def __init__(self, dim, out_dim, depth, kernel_size=3):
        super().__init__()
        self.layers = nn.ModuleList(ConvNormReLU(dim, dim, kernel_size) for _ in range(depth))
        self.predict = MaskedConv1d(dim, out_dim, kernel_size)

    def forward(self, x, mask):
        for layer in self.layers:
            x = layer(x, mask)
        return outside_autocast(self.predict, x.to(self.predict.conv.weight.dtype), mask)[0]


def outside_autocast(module, *inputs):
    """``module(*inputs)`` in its own (float32) precision even under bf16 autocast: in bf16
    neighbouring scores would tie."""
    with torch.autocast(inputs[0].device.type, enabled=False):
        return module(*inputs)


class ActionFormerHead(nn.Module):
    """ActionFormer-style detection head; see the module docstring.

    Args:
        in_dim: width D of the input features.
        num_classes: number C of action classes.
        embed_dim: width of the embedding, transformer and towers.
        num_levels: pyramid levels (strides 1, 2, ..., 2**(num_levels-1)).
        window: local self-attention window in steps of each level (odd; 19 attends +-9), or
            one per level; -1 attends to the whole sequence (ActivityNet: [7, 7, 7, 7, 7, -1]).
        num_heads: self-attention heads.
        max_seq_len: every input is padded to this length, or a longer one to the next
            multiple of the padding factor (largest stride x window // 2 x 2), as ActionFormer
            does; also the length of the position table of ``use_abs_pe``.
        num_embed_convs: convolutions of the input embedding.
        num_stem_blocks: stride-1 transformer blocks before the pyramid.
        mlp_ratio: hidden width of the transformer MLPs relative to ``embed_dim``.
        dropout: dropout in attention and MLPs.
        drop_path: stochastic depth rate of the transformer blocks' residual branches.
        tower_depth: (conv, LayerNorm, ReLU) layers before each tower's prediction conv.
        use_abs_pe: add a fixed sinusoidal position encoding, divided by sqrt(embed_dim), after
            the embedding (stretched linearly to longer inputs in evaluation).
        regression_ranges: per level (low, high) range, in input feature steps, of the larger of a
            point's distances to a segment's start and end (THUMOS defaults; one per level);
            a high of ``None`` or ``math.inf``: no upper limit.
        center_sample_radius: positives lie within radius * stride of a segment's centre
            (None: anywhere inside the segment).
        cls_prior_prob: initial foreground probability of every class (bias of the cls conv).
        focal_alpha, focal_gamma: sigmoid focal loss parameters.
        reg_loss_weight: weight of the DIoU loss against the focal loss.
        label_smoothing: classification targets become t * (1 - s) + s / (C + 1).
        loss_norm_init, loss_norm_momentum: the losses are divided by an EMA of the number of
            positive points (a buffer, so checkpoints resume it exactly).
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        embed_dim: int = DEFAULT.embed_dim,
        num_levels: int = DEFAULT.num_levels,
        window: int | list = DEFAULT.window,
        num_heads: int = DEFAULT.num_heads,
        max_seq_len: int = DEFAULT.max_seq_len,
        num_embed_convs: int = DEFAULT.num_embed_convs,
        num_stem_blocks: int = DEFAULT.num_stem_blocks,
        mlp_ratio: float = DEFAULT.mlp_ratio,
        dropout: float = DEFAULT.dropout,
        drop_path: float = DEFAULT.drop_path,
        tower_depth: int = DEFAULT.tower_depth,
        use_abs_pe: bool = DEFAULT.use_abs_pe,
        regression_ranges=THUMOS_REGRESSION_RANGES,
        center_sample_radius: float | None = DEFAULT.center_sample_radius,
        cls_prior_prob: float = DEFAULT.cls_prior_prob,
        focal_alpha: float = DEFAULT.focal_alpha,
        focal_gamma: float = DEFAULT.focal_gamma,
        reg_loss_weight: float = DEFAULT.reg_loss_weight,
        label_smoothing: float = DEFAULT.label_smoothing,
        loss_norm_init: float = DEFAULT.loss_norm_init,
        loss_norm_momentum: float = DEFAULT.loss_norm_momentum,
    ):
        super().__init__()
        # Values come from user configs: refuse them by name (ConfigError, a ValueError).
        check_positive_integers(in_dim=in_dim, num_classes=num_classes)
        checked_config(HeadConfig, locals())
        self.num_classes = num_classes
        self.strides = [2 ** level for level in range(num_levels)]
        self.regression_ranges = open_ranges(regression_ranges)
        self.center_sample_radius = center_sample_radius
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.reg_loss_weight = reg_loss_weight
        self.label_smoothing = label_smoothing
        self.loss_norm_momentum = loss_norm_momentum
        self.register_buffer("loss_normalizer", torch.tensor(float(loss_norm_init)))
        self.max_seq_len = max_seq_len
        windows = level_windows(window, num_levels)
        self.padding_factor = padding_factor(windows)
        self.register_buffer("position_table", sinusoid_table(max_seq_len, embed_dim)
                             / math.sqrt(embed_dim) if use_abs_pe else None, persistent=False)

        self.embed = nn.ModuleList(
            ConvNormReLU(in_dim if i == 0 else embed_dim, embed_dim) for i in range(num_embed_convs)
        )
        block = lambda stride, level: TransformerBlock(  # noqa: E731
            embed_dim, num_heads, windows[level], stride, mlp_ratio, dropout, drop_path)
        self.stem = nn.ModuleList(block(1, 0) for _ in range(num_stem_blocks))
        self.branch = nn.ModuleList(block(2, level) for level in range(1, num_levels))
        self.level_norms = nn.ModuleList(nn.LayerNorm(embed_dim) for _ in range(num_levels))
        self.cls_tower = Tower(embed_dim, num_classes, tower_depth)
        self.reg_tower = Tower(embed_dim, 2, tower_depth)
        self.reg_scales = nn.ModuleList(Scale() for _ in range(num_levels))
        for module in self.modules():  # ActionFormer starts every bias at zero ...
            if isinstance(module, (nn.Linear, nn.Conv1d)) and module.bias is not None:
                nn.init.zeros_(module.bias)
        prior_logit = -math.log((1 - cls_prior_prob) / cls_prior_prob)
        nn.init.constant_(self.cls_tower.predict.conv.bias, prior_logit)  # ... but this one

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> dict:
        """x [B, T, D], mask [B, T] bool (True = valid) -> dict of per-level lists:
        "cls_logits" [B, T_l, C], "offsets" [B, T_l, 2] (>= 0, stride units), "masks" [B, T_l].
        T is padded to ``padded_length(T)``, so T_0 may exceed T.
        """
        x, mask = pad_to(x, mask, self.padded_length(x.shape[1]))
        x = zero_padding(x, mask)
        for layer in self.embed:
            x = layer(x, mask)
        if self.position_table is not None:
            x = x + zero_padding(self._positions(x.shape[1]).to(x.dtype).expand_as(x), mask)
        for block in self.stem:
            x, mask = block(x, mask)
        features, masks = [x], [mask]
        for block in self.branch:
            x, mask = block(x, mask)
            features.append(x)
            masks.append(mask)
        out = {"cls_logits": [], "offsets": [], "masks": masks}
        for norm, scale, feature, level_mask in zip(self.level_norms, self.reg_scales, features,
                                                    masks):
            feature = norm(feature)
            out["cls_logits"].append(self.cls_tower(feature, level_mask))
            offsets = outside_autocast(scale, self.reg_tower(feature, level_mask))
            out["offsets"].append(F.relu(offsets))
        return out

    def padded_length(self, length: int) -> int:
        """ActionFormer's input length: ``max_seq_len``, or a longer input rounded up to a
        multiple of the padding factor (its local attention works in chunks of window // 2)."""
        if length <= self.max_seq_len:
            return self.max_seq_len
        return -(-length // self.padding_factor) * self.padding_factor

    def _positions(self, length):
        if length <= self.max_seq_len:
            return self.position_table[:length]
        if self.training:
            raise ValueError(f"sequence of {length} steps exceeds max_seq_len {self.max_seq_len} "
                             "of the absolute position encoding")
        return F.interpolate(self.position_table.T[None], size=length, mode="linear",
                             align_corners=False)[0].T

    def points(self, out: dict):
        """The pyramid points of an output of ``forward`` (see head/targets.py)."""
        lengths = [mask.shape[1] for mask in out["masks"]]
        return make_points(lengths, self.strides, self.regression_ranges,
                           device=out["masks"][0].device)

    def assign(self, out: dict, targets):
        """Targets for a batch: cls [B, P, C], reg [B, P, 2] (see head.targets.assign_batch).
        ``targets``: a ``Targets``, or one dict per video (packed and checked here)."""
        points = self.points(out)
        targets = pack_targets(targets, self.num_classes).to(points.position.device)
        return assign_batch(points, targets, self.num_classes, self.center_sample_radius)

    def loss(self, out: dict, targets, update_normalizer: bool | None = None) -> dict:
        """Focal + DIoU losses of a batch, each divided by the loss normaliser.

        targets: a ``head.targets.Targets``, or one dict per video, "segments" [N, 2] (start,
        end) in feature steps of the input, "labels" [N] int class indices.
        ``update_normalizer`` (default: in training mode) first moves the normaliser EMA with
        this batch's positive count; pass False and call ``update_loss_normalizer`` yourself to
        move it once per optimizer step with a count summed over micro-batches and processes.
        Returns {"cls", "reg", "total", "num_positives"}, all tensors on the device: nothing
        here waits for the device (padding and negatives are zeroed, not indexed out, as an
        index by mask would wait to learn its size).
        """
        cls_targets, reg_targets = self.assign(out, targets)
        logits = torch.cat(out["cls_logits"], dim=1)
        offsets = torch.cat(out["offsets"], dim=1)
        valid = torch.cat(out["masks"], dim=1)
        positive = valid & (cls_targets.sum(-1) > 0)
        count = positive.sum()
        if update_normalizer is None:
            update_normalizer = self.training
        if update_normalizer:
            self.update_loss_normalizer(count)
        normalizer = self.loss_normalizer

        if self.label_smoothing > 0:
            smooth = self.label_smoothing
            cls_targets = cls_targets * (1 - smooth) + smooth / (self.num_classes + 1)
        focal = sigmoid_focal_loss(logits, cls_targets, self.focal_alpha, self.focal_gamma)
        cls_loss = torch.where(valid[..., None], focal, 0.0).sum() / normalizer
        # A sum over no positive is 0 but keeps the towers in the graph (DDP needs every parameter).
        reg_loss = torch.where(positive, diou_loss(offsets, reg_targets), 0.0).sum() / normalizer
        total = cls_loss + self.reg_loss_weight * reg_loss
        return {"cls": cls_loss, "reg": reg_loss, "total": total, "num_positives": count}

    @torch.no_grad()
    def count_positives(self, mask, targets) -> torch.Tensor:
        """How many positive points ``loss`` will find for inputs with this mask [B, T], as a
        0-dim tensor on the mask's device (reading it would wait for that device)."""
        mask = F.pad(mask, (0, self.padded_length(mask.shape[1]) - mask.shape[1]), value=False)
        masks = [downsample_mask(mask, stride) for stride in self.strides]
        cls, _ = self.assign({"masks": masks}, targets)
        return (torch.cat(masks, dim=1) & (cls.sum(-1) > 0)).sum()

    @torch.no_grad()
    def update_loss_normalizer(self, num_positives) -> None:
        """normaliser = momentum * normaliser + (1 - momentum) * max(num_positives, 1)."""
        observed = torch.as_tensor(num_positives, dtype=self.loss_normalizer.dtype,
                                   device=self.loss_normalizer.device).clamp(min=1)
        self.loss_normalizer.mul_(self.loss_norm_momentum).add_(
            (1 - self.loss_norm_momentum) * observed)

    @classmethod
    def from_config(cls, in_dim: int, num_classes: int, config: HeadConfig) -> "ActionFormerHead":
        """The head a ``HeadConfig`` describes, for features of width ``in_dim``."""
        return cls(in_dim, num_classes, **config_arguments(config))

    @torch.no_grad()
    def predict(self, out: dict, **postprocess_options):
        """Detections per video: list of {"segments" [N, 2] (feature steps), "scores" [N],
        "labels" [N]}, best first. Options (THUMOS defaults): see head.postprocess.postprocess.
        """
        return postprocess(out, self.strides, **postprocess_options)


def pad_to(x, mask, length: int):
    """Pad [B, T, D] and its mask with invalid steps to ``length`` steps."""
    extra = length - x.shape[1]
    if extra == 0:
        return x, mask
    return F.pad(x, (0, 0, 0, extra)), F.pad(mask, (0, extra), value=False)


def sinusoid_table(length: int, dim: int) -> torch.Tensor:
    """The fixed sine/cosine position encoding of "Attention is all you need", [length, dim]."""
    position = torch.arange(length, dtype=torch.float64)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(1e4) / dim))
    table = torch.zeros(length, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table.float()
