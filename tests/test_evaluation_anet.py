"""The ActivityNet protocol: a class-agnostic detector whose detections video-level scores label.

Synthetic ActivityNet-like data written by the tests (we have no ActivityNet annotation file).
"""
import json

import numpy as np
import pytest
import torch

from evaluation import load_annotations
from store import FeatureStore
from test_training import (CLASSES, synthetic_videos, tiny_config, write_annotations,
                           write_store)
from training.data import AGNOSTIC_LABEL, StoreDataset
from training.infer import infer
from training.train import train


@pytest.fixture(scope="module")
def anet_files(tmp_path_factory):
    """4 training and 2 validation videos in a store, and their annotations."""
    root = tmp_path_factory.mktemp("anet")
    videos = {**synthetic_videos(4, "training"), **synthetic_videos(2, "validation", first=4)}
    return write_store(root / "store.zarr", videos), write_annotations(root / "gt.json", videos)


# -- class-agnostic training -------------------------------------------------------------------
def test_class_agnostic_dataset_gives_every_action_the_one_class(anet_files):
    store_path, annotations_path = anet_files
    annotations = load_annotations(annotations_path)
    config = tiny_config(data={"class_agnostic": True})
    dataset = StoreDataset(FeatureStore.open(store_path), store_path, annotations,
                           annotations_path, "training", [AGNOSTIC_LABEL], [], config.data,
                           train=True)
    labels = np.concatenate([t.labels for t in dataset.truth.values()])
    written = sum(len(v.labels) for v in annotations.videos("training").values())
    assert len(labels) == written and set(labels.tolist()) == {0}
    assert len({a for v in annotations.videos("training").values() for a in v.labels}) > 1


def test_class_agnostic_training_learns_one_class_and_infer_labels_it(anet_files, tmp_path):
    store_path, annotations_path = anet_files
    config = tiny_config(data={"class_agnostic": True}, model={"type": "head_only"},
                         train={"epochs": 20}, eval={"subset": "training", "every": 20},
                         head={"drop_path": 0.0})
    summary = train(config, store_path, annotations_path, tmp_path / "run", progress=False)
    # scored against every action relabelled as the one class
    assert summary["best"]["average_map"] >= 0.9
    checkpoint = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)
    assert checkpoint["classes"] == [AGNOSTIC_LABEL]
    assert checkpoint["ema"]["head.cls_tower.predict.conv.bias"].shape == (1,)
    predictions = infer(tmp_path / "run", store_path, annotations_path, subset="validation")
    labels = {d["label"] for items in predictions["results"].values() for d in items}
    assert labels == {AGNOSTIC_LABEL} and set(CLASSES).isdisjoint(labels)
