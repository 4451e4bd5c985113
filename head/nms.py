"""Per-class non-maximum suppression of 1-D segments in plain torch (no compiled extension).

One greedy loop serves all methods: repeatedly keep the highest-scoring live detection of each
class and rescale the scores of the others of that class by a weight of their IoU with it:

* ``"soft"``   Gaussian Soft-NMS (Bodla et al. 2017): weight = exp(-IoU**2 / sigma);
* ``"linear"`` linear Soft-NMS: weight = 1 - IoU where IoU >= iou_threshold, else 1;
* ``"hard"``   classic NMS: weight = 0 where IoU >= iou_threshold, else 1.

As in ActionFormer's NMS extension, every segment's length counts 1e-6 more in these IoUs
(``NMS_LENGTH_OFFSET``), so zero-length segments have a defined overlap.

A detection dies when its score falls below ``min_score`` or its weight is 0. All classes run
side by side: each loop step works on a [classes, detections] matrix, so the number of steps is
the largest number kept in any one class, not the number of detections.
"""
from __future__ import annotations

import math

import torch

from head.config import NMS_METHODS as METHODS
from head.config import PostprocessConfig

DEFAULT = PostprocessConfig()  # the defaults below (written once, in head/config.py)
NMS_LENGTH_OFFSET = 1e-6


def segment_iou(segment, segments, eps: float = 1e-12, length_offset: float = 0.0):
    """IoU of segment [..., 2] against segments [..., 2] (broadcasting), shape [...];
    ``length_offset`` is added to each segment's length in the union."""
    intersection = (torch.minimum(segment[..., 1], segments[..., 1])
                    - torch.maximum(segment[..., 0], segments[..., 0])).clamp(min=0)
    union = ((segment[..., 1] - segment[..., 0]) + (segments[..., 1] - segments[..., 0])
             + 2 * length_offset - intersection)
    return intersection / union.clamp(min=eps)


def suppression_weight(iou, nms_method: str, iou_threshold: float, sigma: float):
    """How much a detection keeps of its score next to a kept one it overlaps by ``iou``."""
    if nms_method == "soft":
        return torch.exp(-(iou * iou) / sigma)
    if nms_method == "linear":
        return torch.where(iou >= iou_threshold, 1 - iou, torch.ones_like(iou))
    if nms_method == "hard":
        return (iou < iou_threshold).to(iou.dtype)
    raise ValueError(f"unknown NMS method {nms_method!r}; choose one of {METHODS}")


def suppress(segments, scores, labels, nms_method: str = DEFAULT.nms_method,
             iou_threshold: float = DEFAULT.iou_threshold, sigma: float = DEFAULT.sigma,
             min_score: float = DEFAULT.min_score, max_segments: int | None = DEFAULT.max_segments,
             voting_iou: float | None = DEFAULT.voting_iou):
    """One video's final detections: per-class NMS (or ``nms_method="none"``: rank only), then
    optional boundary voting among the candidates overlapping each kept segment by
    ``voting_iou`` (see ``segment_voting``). Returns (segments, scores, labels), best first.
    """
    if nms_method == "none":
        order = scores.argsort(descending=True, stable=True)[:max_segments]
        kept = segments[order], scores[order], labels[order]
    else:
        kept = batched_nms(segments, scores, labels, nms_method, iou_threshold, sigma, min_score,
                           max_segments)
    kept_segments, kept_scores, kept_labels = kept
    if voting_iou is not None and kept_segments.shape[0]:
        kept_segments = segment_voting(kept_segments, kept_labels, segments, scores, labels,
                                       voting_iou)
    return kept_segments, kept_scores, kept_labels


def batched_nms(segments, scores, labels, nms_method: str = DEFAULT.nms_method,
                iou_threshold: float = DEFAULT.iou_threshold, sigma: float = DEFAULT.sigma,
                min_score: float = DEFAULT.min_score,
                max_segments: int | None = DEFAULT.max_segments):
    """Per-class NMS of one video's detections.

    segments [N, 2], scores [N], labels [N] int. Returns (segments, scores, labels) of the kept
    detections with their (possibly decayed) scores, best first (stable on ties: class, then the
    order in which they were kept), at most ``max_segments`` (None: no limit).
    """
    if nms_method not in METHODS:
        raise ValueError(f"unknown NMS method {nms_method!r}; choose one of {METHODS}")
    limit = segments.shape[0] if max_segments is None else min(max_segments, segments.shape[0])
    grid_segments, grid_scores, grid_labels, alive = _per_class_grid(segments, scores, labels)
    alive &= grid_scores >= min_score
    rows = torch.arange(grid_scores.shape[0], device=scores.device)
    kept_columns, kept_scores, kept_valid = [], [], []
    for _ in range(limit):
        if not alive.any():
            break
        best = grid_scores.masked_fill(~alive, -math.inf).argmax(dim=1)   # first on ties
        valid = alive[rows, best]
        kept_columns.append(best)
        kept_scores.append(grid_scores[rows, best])
        kept_valid.append(valid)
        alive[rows, best] = False
        iou = segment_iou(grid_segments[rows, best][:, None], grid_segments,
                          length_offset=NMS_LENGTH_OFFSET)
        weight = suppression_weight(iou, nms_method, iou_threshold, sigma)
        grid_scores = torch.where(alive, grid_scores * weight, grid_scores)
        alive &= (grid_scores >= min_score) & (weight > 0)
    if not kept_columns:
        return segments[:0], scores[:0], labels[:0]
    # [classes, steps] flattened: class-major, then keep order.
    columns = torch.stack(kept_columns, dim=1).flatten()
    class_rows = rows[:, None].expand(-1, len(kept_columns)).flatten()
    valid = torch.stack(kept_valid, dim=1).flatten()
    out_scores = torch.stack(kept_scores, dim=1).flatten()[valid]
    out_segments = grid_segments[class_rows, columns][valid]
    out_labels = grid_labels[class_rows][valid]
    order = torch.sort(out_scores, descending=True, stable=True).indices[:limit]
    return out_segments[order], out_scores[order], out_labels[order]


def _per_class_grid(segments, scores, labels):
    """Scatter detections into [classes present, most detections in a class] matrices.

    Within a class the original order is kept, so argmax ties resolve to the earliest detection.
    """
    classes, row = torch.unique(labels, return_inverse=True)
    order = torch.sort(row, stable=True).indices
    counts = torch.bincount(row, minlength=classes.shape[0])
    starts = torch.cumsum(counts, 0) - counts
    column = torch.empty_like(row)
    column[order] = torch.arange(row.shape[0], device=row.device) - starts[row[order]]
    width = int(counts.max()) if counts.numel() else 0
    shape = (classes.shape[0], width)
    grid_segments = segments.new_zeros(*shape, 2)
    grid_scores = scores.new_zeros(shape)
    alive = torch.zeros(shape, dtype=torch.bool, device=scores.device)
    grid_segments[row, column] = segments
    grid_scores[row, column] = scores
    alive[row, column] = True
    return grid_segments, grid_scores, classes, alive


def segment_voting(kept_segments, kept_labels, segments, scores, labels, iou_threshold: float,
                   chunk: int = 256):
    """Refine each kept segment to the mean of the candidates of its class that overlap it by
    at least ``iou_threshold``, each weighted by score x IoU (ActionFormer's voting, which it
    applies after class-agnostic NMS; a kept segment always overlaps itself among the
    candidates).

    Works on ``chunk`` kept segments at a time, so memory stays at chunk x candidates.
    """
    voted = []
    for start in range(0, kept_segments.shape[0], chunk):
        kept, kept_label = kept_segments[start:start + chunk], kept_labels[start:start + chunk]
        iou = segment_iou(kept[:, None], segments[None])                     # [k, N]
        weight = scores[None] * iou * ((iou >= iou_threshold)
                                       & (kept_label[:, None] == labels[None]))
        total = weight.sum(dim=1, keepdim=True)
        mean = (weight @ segments) / total.clamp(min=1e-12)
        voted.append(torch.where(total > 0, mean, kept))
    return torch.cat(voted) if voted else kept_segments
