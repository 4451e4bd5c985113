"""From the head's per-level outputs to a ranked list of segments per video (feature steps)."""
from __future__ import annotations

import torch

from head.config import PostprocessConfig
from head.nms import suppress

DEFAULT = PostprocessConfig()  # the defaults below (written once, in head/config.py)


def decode_level(cls_logits, offsets, mask, stride: int, score_threshold: float, top_k: int,
                 min_duration: float):
    """Candidates of one level of one video.

    cls_logits [T, C], offsets [T, 2] (stride units), mask [T] -> segments [n, 2] (feature
    steps), scores [n], labels [n]: the ``top_k`` best (point, class) pairs scoring above the
    threshold whose segment is longer than ``min_duration`` steps.
    """
    num_classes = cls_logits.shape[1]
    scores = torch.sigmoid(cls_logits.float()) * mask[:, None]
    scores = scores.flatten()
    keep = torch.nonzero(scores > score_threshold).squeeze(1)
    if keep.numel() > top_k:
        keep = keep[scores[keep].topk(top_k).indices]
    point, label = keep // num_classes, keep % num_classes
    position = point.to(torch.float32) * stride
    distance = offsets[point].float() * stride
    segments = torch.stack([position - distance[:, 0], position + distance[:, 1]], dim=1)
    # Selected by index, not by mask: one wait for the device to learn the count, not three.
    chosen = torch.nonzero((segments[:, 1] - segments[:, 0]) > min_duration).squeeze(1)
    return segments[chosen], scores[keep[chosen]], label[chosen]


def postprocess(out: dict, strides, score_threshold: float = DEFAULT.score_threshold,
                pre_nms_top_k: int = DEFAULT.pre_nms_top_k,
                min_duration: float = DEFAULT.min_duration,
                nms_method: str = DEFAULT.nms_method, iou_threshold: float = DEFAULT.iou_threshold,
                sigma: float = DEFAULT.sigma, min_score: float = DEFAULT.min_score,
                max_segments: int = DEFAULT.max_segments,
                voting_iou: float | None = DEFAULT.voting_iou):
    """Detections per video from the head's output dict (see ``ActionFormerHead.forward``).

    Per level: score threshold and top-k; then per-class NMS over all levels (``nms_method``
    "soft" (Gaussian, ``sigma``), "linear", "hard" (``iou_threshold``) or "none"), optional
    score-weighted boundary voting among same-class candidates overlapping by ``voting_iou``, and
    at most ``max_segments`` per video. Returns a list (one per video) of dicts with
    "segments" [N, 2] float (start, end in feature steps of the head's input; not clamped to the
    video), "scores" [N] and "labels" [N] int, best first.
    """
    detections = []
    for video in range(out["masks"][0].shape[0]):
        levels = [
            decode_level(cls[video], off[video], mask[video], stride, score_threshold,
                         pre_nms_top_k, min_duration)
            for cls, off, mask, stride in zip(out["cls_logits"], out["offsets"], out["masks"],
                                              strides)
        ]
        segments, scores, labels = (torch.cat(parts) for parts in zip(*levels))
        kept_segments, kept_scores, kept_labels = suppress(
            segments, scores, labels, nms_method, iou_threshold, sigma, min_score, max_segments,
            voting_iou)
        detections.append({"segments": kept_segments, "scores": kept_scores,
                           "labels": kept_labels})
    return detections
