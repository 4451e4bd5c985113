"""ActionFormer's anchor-free detection head: model, targets, losses, NMS, post-processing,
and the loading of official ActionFormer weights (head.actionformer).

Names load on first use (PEP 562), so ``import head.config`` does not import torch.
"""
from losa_tal import lazy_attributes

_HOMES = {"ActionFormerHead": "head.model", "HeadConfig": "head.config",
          "PostprocessConfig": "head.config", "THUMOS_REGRESSION_RANGES": "head.config",
          "Points": "head.targets", "Targets": "head.targets", "assign_targets": "head.targets",
          "assign_batch": "head.targets", "make_points": "head.targets",
          "pack_targets": "head.targets",
          "batched_nms": "head.nms", "segment_iou": "head.nms", "suppress": "head.nms",
          "postprocess": "head.postprocess"}
__all__ = sorted(_HOMES)

__getattr__ = lazy_attributes(__name__, _HOMES)
