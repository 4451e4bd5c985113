"""Evaluation of temporal action detections: parsing, mAP, reports, plots, diagnosis, timelines.

```python
from evaluation import load_annotations, load_predictions, evaluate_map
ann = load_annotations("thumos14.json")
report = evaluate_map(ann, load_predictions("preds.json"), subset="test",
                      tiou_thresholds=parse_tiou(dataset="thumos"))
```

Nothing here imports torch; matplotlib and decord are imported only by the plotting functions.
"""
import importlib

# Public name -> submodule. Imported on first use, so that `cli.py evaluate` loads only what
# it runs (the diagnosis, plots and timelines cost start-up time it does not need).
_EXPORTS = {
    "Annotations": "annotations", "CleaningCounts": "annotations",
    "VideoAnnotation": "annotations", "load_annotations": "annotations",
    "diagnose": "diagnosis", "write_diagnosis": "diagnosis",
    "fuse_predictions": "fusion", "load_video_scores": "fusion",
    "elementwise_tiou": "matching",
    "Evaluation": "metrics", "EvaluationWarning": "metrics", "average_precision": "metrics",
    "evaluate_detections": "metrics", "evaluate_map": "metrics",
    "write_plots": "plots",
    "Predictions": "predictions", "load_predictions": "predictions",
    "format_report": "report",
    "parse_tiou": "thresholds",
    "plot_timeline": "timeline",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'evaluation' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
