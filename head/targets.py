"""Anchor points of the feature pyramid and the assignment of ground truth to them.

Units: everything is in feature steps of the head's input (level 0). Level l has stride 2**l
and its point t sits at position t * 2**l. A point regresses its distances to a segment's start
and end, divided by its stride.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Points:
    """All pyramid points of one sequence, levels concatenated (P points)."""

    position: torch.Tensor   # [P] float, feature steps
    stride: torch.Tensor     # [P] float
    range_low: torch.Tensor  # [P] float, smallest max(start, end) distance the point regresses
    range_high: torch.Tensor  # [P] float, largest (inf at the top level)


def make_points(level_lengths, strides, regression_ranges, device=None) -> Points:
    """Points for levels of the given lengths, strides and regression ranges (feature steps)."""
    parts = []
    for length, stride, (low, high) in zip(level_lengths, strides, regression_ranges):
        position = torch.arange(length, device=device, dtype=torch.float32) * stride
        rest = torch.tensor([stride, low, high], device=device, dtype=torch.float32)
        parts.append(torch.cat([position[:, None], rest.expand(length, 3)], dim=1))
    table = torch.cat(parts)
    return Points(*table.unbind(1))


def assign_targets(points: Points, segments, labels, num_classes: int,
                   center_sample_radius: float | None = 1.5, equal_length_tol: float = 1e-3):
    """Classification and regression targets for every point of one video (ActionFormer's
    ``label_points_single_video``).

    segments [N, 2] (start, end) in feature steps, labels [N] int class indices.
    A point is a candidate for a segment when
      * it lies strictly inside the segment's centre region: within
        ``center_sample_radius * stride`` of the segment centre and inside the segment (None:
        anywhere inside the segment); a point exactly on the region's edge is not a candidate;
      * the larger of its distances to start and end lies in its level's regression range
        (both ends inclusive).
    Among candidates the shortest segment wins and gives the regression target (the first one
    listed on equal lengths); every candidate whose length is within ``equal_length_tol`` of the
    shortest adds its label, so equally short segments with different labels (THUMOS's
    duplicated CricketBowling/CricketShot segments) give a multi-label point.

    Returns cls [P, num_classes] float (0/1) and reg [P, 2] float: (position - start,
    end - position) / stride of the winning segment (zeros where no segment is assigned).
    """
    num_points = points.position.shape[0]
    device = points.position.device
    segments = segments.to(device=device, dtype=torch.float32).reshape(-1, 2)
    labels = labels.to(device=device, dtype=torch.long).reshape(-1)
    _check_ground_truth(segments, labels, num_classes)
    if segments.shape[0] == 0:
        return torch.zeros(num_points, num_classes, device=device), torch.zeros(num_points, 2,
                                                                                 device=device)

    position = points.position[:, None]                       # [P, 1] against [N]
    start, end = segments[:, 0], segments[:, 1]
    to_start, to_end = position - start, end - position       # [P, N]
    if center_sample_radius is None:
        inside = torch.minimum(to_start, to_end) > 0
    else:
        center = (start + end) / 2
        radius = center_sample_radius * points.stride[:, None]
        inside = torch.minimum(position - torch.maximum(center - radius, start),
                               torch.minimum(center + radius, end) - position) > 0
    reach = torch.maximum(to_start, to_end)
    in_range = (reach >= points.range_low[:, None]) & (reach <= points.range_high[:, None])
    candidate = inside & in_range

    length = (end - start).expand(num_points, -1).masked_fill(~candidate, float("inf"))
    shortest, winner = length.min(dim=1)                       # first shortest
    carries_label = candidate & (length <= shortest[:, None] + equal_length_tol)  # [P, N]
    one_hot = torch.nn.functional.one_hot(labels, num_classes).float()
    cls = (carries_label.float() @ one_hot).clamp(max=1.0)
    offsets = torch.stack([to_start, to_end], dim=-1)          # [P, N, 2]
    reg = offsets[torch.arange(num_points, device=device), winner] / points.stride[:, None]
    reg = reg * candidate.any(dim=1)[:, None]
    return cls, reg


def _check_ground_truth(segments, labels, num_classes):
    if labels.shape[0] != segments.shape[0]:
        raise ValueError(f"{segments.shape[0]} segments but {labels.shape[0]} labels")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.tolist()}")
    if (segments[:, 1] < segments[:, 0]).any():
        raise ValueError(f"segments must have start <= end, got {segments.tolist()}")
