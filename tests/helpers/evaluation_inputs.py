"""Small builders of ground-truth and prediction dicts for the evaluation tests."""
import json
import os

import pytest

from helpers import REPO

# The real THUMOS-14 files live in the shared folder beside the checkout (in CI too); never copied
# here. Elsewhere the environment variable may point to them; without them those tests skip.
THUMOS_ENV = "LOSA_TAL_THUMOS_DIR"
THUMOS_DIR = os.environ.get(THUMOS_ENV) or str(
    REPO.parent / "shared" / "data" / "annotations")
ACTIONFORMER_FILE = f"{THUMOS_DIR}/thumos14.json"
OPENTAD_FILE = f"{THUMOS_DIR}/thumos_14_anno.json"
needs_thumos = pytest.mark.skipif(
    not all(os.path.isfile(path) for path in (ACTIONFORMER_FILE, OPENTAD_FILE)),
    reason=f"the real THUMOS-14 annotations (thumos14.json, thumos_14_anno.json) are not in "
           f"{THUMOS_DIR}; set {THUMOS_ENV} to their folder")


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
