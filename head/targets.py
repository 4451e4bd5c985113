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
    """Points for levels of the given lengths, strides and regression ranges (feature steps).

    Built on ``device`` by fills alone: a table copied from the host would wait for it."""
    parts = []
    for length, stride, (low, high) in zip(level_lengths, strides, regression_ranges):
        position = torch.arange(length, device=device, dtype=torch.float32) * stride
        rest = [torch.full((length,), value, device=device, dtype=torch.float32)
                for value in (stride, low, high)]
        parts.append(torch.stack([position, *rest], dim=1))
    table = torch.cat(parts)
    return Points(*table.unbind(1))


@dataclass
class Targets:
    """Ground truth of a batch of videos, padded to the most segments of any video.

    segments [B, N, 2] float32 (start, end) in feature steps; labels [B, N] int64 class
    indices, -1 on the padding rows. Built on the host by ``pack_targets``, which checks them.
    """

    segments: torch.Tensor
    labels: torch.Tensor

    def pin_memory(self) -> "Targets":
        """In page-locked memory (the DataLoader calls this with ``pin_memory``)."""
        return Targets(self.segments.pin_memory(), self.labels.pin_memory())

    def to(self, device) -> "Targets":
        """On ``device``, copied without making the host wait: from page-locked memory on CUDA."""
        device = torch.device(device)
        moved = self
        if device.type == "cuda" and self.labels.device.type == "cpu" \
                and not self.labels.is_pinned():
            moved = self.pin_memory()
        return Targets(moved.segments.to(device, non_blocking=True),
                       moved.labels.to(device, non_blocking=True))


def pack_targets(targets, num_classes: int | None = None) -> Targets:
    """One ``Targets`` from a list of per-video {"segments" [N, 2], "labels" [N]} (a Targets is
    returned as it is). Checks every video, with labels in [0, num_classes) when given; do it
    on the host: on a GPU each check would wait for the device."""
    if isinstance(targets, Targets):
        return targets
    most = max((len(t["labels"]) for t in targets), default=0)
    segments = torch.zeros(len(targets), most, 2)
    labels = torch.full((len(targets), most), -1, dtype=torch.long)
    for i, target in enumerate(targets):
        video_segments = torch.as_tensor(target["segments"]).float().reshape(-1, 2)
        video_labels = torch.as_tensor(target["labels"]).long().reshape(-1)
        _check_ground_truth(video_segments, video_labels, num_classes)
        segments[i, :len(video_labels)] = video_segments
        labels[i, :len(video_labels)] = video_labels
    return Targets(segments, labels)


def assign_targets(points: Points, segments, labels, num_classes: int,
                   center_sample_radius: float | None = 1.5, equal_length_tol: float = 1e-3):
    """Classification and regression targets for every point of one video (ActionFormer's
    ``label_points_single_video``): ``assign_batch`` for a batch of one.

    segments [N, 2] (start, end) in feature steps, labels [N] int class indices.
    Returns cls [P, num_classes] float (0/1) and reg [P, 2] float.
    """
    targets = pack_targets([{"segments": segments, "labels": labels}], num_classes)
    cls, reg = assign_batch(points, targets.to(points.position.device), num_classes,
                            center_sample_radius, equal_length_tol)
    return cls[0], reg[0]


def assign_batch(points: Points, targets: Targets, num_classes: int,
                 center_sample_radius: float | None = 1.5, equal_length_tol: float = 1e-3):
    """Classification and regression targets for every point of every video of a batch, on the
    points' device without a host sync.

    A point is a candidate for a segment when
      * it lies strictly inside the segment's centre region: within
        ``center_sample_radius * stride`` of the segment centre and inside the segment (None:
        anywhere inside the segment); a point exactly on the region's edge is not a candidate;
      * the larger of its distances to start and end lies in its level's regression range
        (both ends inclusive).
    Among candidates the shortest segment wins and gives the regression target (the first one
    listed on equal lengths); every candidate whose length is within ``equal_length_tol`` of the
    shortest adds its label, so equally short segments with different labels (THUMOS's
    duplicated CricketBowling/CricketShot segments) give a multi-label point. Padding rows
    (label -1) are candidates for nothing.

    Returns cls [B, P, num_classes] float (0/1) and reg [B, P, 2] float: (position - start,
    end - position) / stride of the winning segment (zeros where no segment is assigned).
    """
    device = points.position.device
    segments, labels = targets.segments, targets.labels       # [B, N, 2], [B, N]
    batch, num_segments = labels.shape
    num_points = points.position.shape[0]
    if num_segments == 0:
        return (torch.zeros(batch, num_points, num_classes, device=device),
                torch.zeros(batch, num_points, 2, device=device))

    per_point = lambda values: values[None, :, None]  # noqa: E731  [P] against [B, 1, N]
    position, stride = per_point(points.position), per_point(points.stride)
    start, end = segments[:, None, :, 0], segments[:, None, :, 1]
    to_start, to_end = position - start, end - position       # [B, P, N]
    if center_sample_radius is None:
        inside = torch.minimum(to_start, to_end) > 0
    else:
        center = (start + end) / 2
        radius = center_sample_radius * stride
        inside = torch.minimum(position - torch.maximum(center - radius, start),
                               torch.minimum(center + radius, end) - position) > 0
    reach = torch.maximum(to_start, to_end)
    in_range = (reach >= per_point(points.range_low)) & (reach <= per_point(points.range_high))
    candidate = inside & in_range & (labels >= 0)[:, None, :]

    length = (end - start).expand(-1, num_points, -1).masked_fill(~candidate, float("inf"))
    shortest, winner = length.min(dim=2)                       # first shortest
    carries_label = candidate & (length <= shortest[..., None] + equal_length_tol)
    one_hot = (labels[..., None] == torch.arange(num_classes, device=device)).float()  # [B, N, C]
    cls = torch.bmm(carries_label.float(), one_hot).clamp(max=1.0)
    offsets = torch.stack([to_start, to_end], dim=-1)          # [B, P, N, 2]
    won = offsets.gather(2, winner[..., None, None].expand(-1, -1, 1, 2)).squeeze(2)
    reg = won / stride * candidate.any(dim=2)[..., None]
    return cls, reg


def _check_ground_truth(segments, labels, num_classes=None):
    if labels.shape[0] != segments.shape[0]:
        raise ValueError(f"{segments.shape[0]} segments but {labels.shape[0]} labels")
    high = f", {num_classes})" if num_classes is not None else ", ...)"
    if labels.numel() and (labels.min() < 0 or (num_classes is not None
                                                 and labels.max() >= num_classes)):
        raise ValueError(f"labels must lie in [0{high}, got {labels.tolist()}")
    if (segments[:, 1] < segments[:, 0]).any():
        raise ValueError(f"segments must have start <= end, got {segments.tolist()}")
