"""Synthetic feature stores for the stage-two tests, written through the store API, and the tiny
detector config that trains on them in seconds.

The stores hold random features with an injected signal: during each annotated action the
last-layer features (and, through them, the intermediate tokens) move along a direction of the
action's class, so a detector can learn the segments from a handful of videos in seconds.
"""
import json
from pathlib import Path

import numpy as np
import torch

from evaluation import load_annotations
from store import LAST, FeatureStore
from training.config import Config
from training.data import StoreDataset

CLASSES = ["Jump", "Run", "Throw"]
DIM, LAYERS, TOKENS = 16, (1, 2), (1, 1, 2)


def synthetic_videos(count, subset, first=0, num_steps=96, seed=0):
    """Videos with 3 actions each; features carry a class direction during every action."""
    rng = np.random.default_rng([seed, first])
    directions = np.random.default_rng(1234).normal(size=(len(CLASSES), DIM)) * 1.5
    videos = {}
    for index in range(first, first + count):
        # Clip centres of 16-frame clips every 4 frames at 30 fps, as the store records them.
        times = (np.arange(num_steps) * 4 + 8) / 30.0
        last = rng.normal(size=(num_steps, DIM)).astype(np.float32) * 0.5
        annotations = []
        for start in range(4, num_steps - 16, num_steps // 4):
            label = int(rng.integers(len(CLASSES)))
            length = int(rng.integers(4, 14))
            last[start:start + length] += directions[label]
            annotations.append({"segment": [round(float(times[start]), 3),
                                            round(float(times[start + length - 1]), 3)],
                                "label": CLASSES[label]})
        videos[f"video_{index:03d}"] = {"subset": subset, "times": times, "last": last,
                                        "annotations": annotations}
    return videos


def write_store(path, videos, layers=LAYERS, tokens=TOKENS, dim=DIM, seed=0, dtype="float32"):
    meta = {"backbone": {"preset": None, "kwargs": {"embed_dim": dim}, "checkpoint": None,
                         "random_init_seed": seed},
            "protocol": {"clip_len": 16, "frame_interval": 1, "clip_stride": 4},
            "layers": list(layers), "tokens": list(tokens) if layers else None,
            "feature_dim": dim, "dtype": dtype}
    store = FeatureStore.create(path, meta)
    rng = np.random.default_rng(seed)
    num_tokens = int(np.prod(tokens))
    for vid, video in videos.items():
        last = video["last"][:, :dim]
        features = {LAST: last}
        for layer in layers:
            noise = rng.normal(size=(len(last), num_tokens, dim)) * 0.3
            features[layer] = (last[:, None, :] + noise).astype(np.float32)
        store.write_video(vid, features, video["times"],
                          {"fps": 30.0, "duration": float(video["times"][-1] + 0.3)})
    return path


def write_annotations(path, videos):
    database = {vid: {"subset": v["subset"], "duration": float(v["times"][-1] + 0.3),
                      "annotations": v["annotations"]} for vid, v in videos.items()}
    path.write_text(json.dumps({"database": database}))
    return path



def tiny_config(**sections) -> Config:
    """A detector small enough to train for a few dozen steps in seconds on one CPU thread."""
    data = {
        "model": {"losa": {"bottleneck": 16, "num_heads": 2, "short_window": 3, "dropout": 0.1}},
        # max_seq_len 96: the head pads every input to it (ActionFormer), here the video length
        "head": {"embed_dim": 32, "num_levels": 3, "window": 5, "num_heads": 2, "max_seq_len": 96,
                 "regression_ranges": [[0, 4], [4, 8], [8, None]], "drop_path": 0.1},
        "train": {"epochs": 3, "batch_size": 2, "micro_batch": 1},
        "optim": {"warmup_epochs": 1, "lr_head": 2e-3, "lr_adapter": 2e-3, "ema_decay": 0.8},
        "eval": {"every": 0},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return Config.from_dict(data)


def write_config(path, config: Config):
    path.write_text(json.dumps(config.to_dict()))
    return path


def final_weights(run_dir):
    return torch.load(Path(run_dir) / "last.pt", map_location="cpu", weights_only=True)


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key



class CountingStore:
    """Wraps a store and records which layers and clip ranges were read."""

    def __init__(self, store):
        self.store, self.reads = store, []

    def __getattr__(self, name):
        return getattr(self.store, name)

    def __contains__(self, vid):
        return vid in self.store

    def read(self, vid, layers, start=0, stop=None, **options):
        self.reads.append((tuple(layers), start, stop))
        return self.store.read(vid, layers=layers, start=start, stop=stop, **options)


def make_dataset(store_path, annotations_path, train=True, layers=LAYERS, **data):
    config = tiny_config(data=data)
    store = CountingStore(FeatureStore.open(store_path))
    annotations = load_annotations(annotations_path)
    subset = "training" if train else "validation"
    return StoreDataset(store, annotations, subset, CLASSES, list(layers), config.data,
                        train=train, seed=3)
