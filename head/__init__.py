"""ActionFormer's anchor-free detection head: model, targets, losses, NMS, post-processing,
and the loading of official ActionFormer weights (head.actionformer)."""
from head.model import THUMOS_REGRESSION_RANGES, ActionFormerHead
from head.nms import batched_nms, segment_iou, suppress
from head.postprocess import postprocess
from head.targets import Points, assign_targets, make_points

__all__ = ["ActionFormerHead", "THUMOS_REGRESSION_RANGES", "Points", "assign_targets",
           "batched_nms", "make_points", "postprocess", "segment_iou", "suppress"]
