"""Losses of the detection head: sigmoid focal loss and 1-D distance-IoU loss (per element)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sigmoid_focal_loss(logits, targets, alpha: float = 0.25, gamma: float = 2.0):
    """Focal loss (Lin et al. 2017) of independent sigmoid classifiers, same shape as logits.

    Down-weights easy examples by (1 - p_t)**gamma; ``alpha`` weighs positives against
    negatives (a negative alpha disables the weighting). Targets may be soft (label smoothing).
    """
    logits, targets = logits.float(), targets.float()
    prob = torch.sigmoid(logits)
    cross_entropy = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = cross_entropy * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss


def diou_loss(pred, target, eps: float = 1e-8):
    """Distance-IoU loss (Zheng et al. 2020) of 1-D segments given as distances from one point.

    pred, target [..., 2]: non-negative (distance to start, distance to end) from the same point.
    Loss = 1 - IoU + (centre distance / enclosing length)**2, shape [...].
    """
    pred, target = pred.float(), target.float()
    pred_start, pred_end = pred.unbind(-1)
    true_start, true_end = target.unbind(-1)
    intersection = torch.minimum(pred_start, true_start) + torch.minimum(pred_end, true_end)
    union = pred_start + pred_end + true_start + true_end - intersection
    iou = intersection / union.clamp(min=eps)
    enclosing = torch.maximum(pred_start, true_start) + torch.maximum(pred_end, true_end)
    # Centres relative to the point: (end - start) / 2 for each segment.
    centre_distance = ((pred_end - pred_start) - (true_end - true_start)) / 2
    return 1 - iou + (centre_distance / enclosing.clamp(min=eps)) ** 2
