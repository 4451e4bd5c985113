"""Small builders of ground-truth and prediction dicts for the evaluation tests."""
import json
from pathlib import Path

# The real THUMOS-14 files live in the shared folder beside the checkout (in CI too); never copied here.
THUMOS_DIR = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "annotations")
ACTIONFORMER_FILE = f"{THUMOS_DIR}/thumos14.json"
OPENTAD_FILE = f"{THUMOS_DIR}/thumos_14_anno.json"


def gt_dict(videos: dict, subset: str = "test", duration: float = 100.0) -> dict:
    """``{vid: [(start, end, label), ...]}`` -> ActivityNet-layout ground truth."""
    return {"database": {
        vid: {"subset": subset, "duration": duration,
              "annotations": [{"segment": [s, e], "label": label} for s, e, label in segments]}
        for vid, segments in videos.items()}}


def preds_dict(videos: dict) -> dict:
    """``{vid: [(start, end, label, score), ...]}`` -> predictions dict."""
    return {"results": {vid: [{"segment": [s, e], "label": label, "score": score}
                              for s, e, label, score in detections]
                        for vid, detections in videos.items()}}


def write_json(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)
