"""Evaluation of temporal action detections: parsing, mAP, reports, plots, diagnosis, timelines.

```python
from evaluation import load_annotations, load_predictions, evaluate_map
ann = load_annotations("thumos14.json")
report = evaluate_map(ann, load_predictions("preds.json"), subset="test",
                      tiou_thresholds=parse_tiou(dataset="thumos"))
```

Nothing here imports torch; matplotlib and decord are imported only by the plotting functions.
"""
from .annotations import Annotations, CleaningCounts, VideoAnnotation, load_annotations
from .diagnosis import diagnose, write_diagnosis
from .matching import segment_iou
from .metrics import (Evaluation, EvaluationWarning, average_precision, evaluate_detections,
                      evaluate_map)
from .plots import write_plots
from .predictions import Predictions, load_predictions
from .report import format_report
from .thresholds import parse_tiou
from .timeline import plot_timeline

__all__ = [
    "Annotations", "CleaningCounts", "Evaluation", "EvaluationWarning", "Predictions",
    "VideoAnnotation", "average_precision", "diagnose", "evaluate_detections", "evaluate_map",
    "format_report", "load_annotations", "load_predictions", "parse_tiou", "plot_timeline",
    "segment_iou", "write_diagnosis", "write_plots",
]
