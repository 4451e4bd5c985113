"""The training input path: float16 from the store to the device, one copy per batch, persistent
workers, and the in-memory cache of the training split (training/cache.py)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import REPO
from helpers.training import (CLASSES, LAYERS, assert_same_state, final_weights, synthetic_videos,
                              tiny_config, write_annotations, write_store)
from losa_tal import InputError
from store import LAST, FeatureStore
from training import cache as cache_module
from training.cache import build_cache, plan_cache, split_bytes
from training.data import StoreDataset, batch_to, collate
from training.train import train

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def fp16_files(tmp_path_factory):
    """A float16 store (as extraction writes it): 4 training and 2 validation videos."""
    root = tmp_path_factory.mktemp("fp16")
    videos = {**synthetic_videos(4, "training", num_steps=120),
              **synthetic_videos(2, "validation", first=4)}
    return (write_store(root / "store.zarr", videos, dtype="float16"),
            write_annotations(root / "gt.json", videos))


def training_set(store_path, annotations_path, **data):
    from evaluation import load_annotations

    config = tiny_config(data={"max_seq_len": 64, **data})
    return StoreDataset(FeatureStore.open(store_path), load_annotations(annotations_path),
                        "training", CLASSES, list(LAYERS), config.data, train=True, seed=5)


def test_features_stay_float16_until_the_device_converts_them(fp16_files):
    dataset = training_set(*fp16_files)
    sample = dataset[(2, 1)]
    assert sample["last"].dtype == sample["inter"].dtype == torch.float16
    assert dataset[(2, 1)]["step_offset"] == sample["step_offset"]  # (epoch, index) keys repeat
    batch = collate([sample, dataset[(2, 0)]])
    assert batch["inter"].dtype == torch.float16 and batch["inter"].shape[:3] == (2, 2, 64)
    moved = batch_to(batch, CPU)
    assert moved["last"].dtype == moved["inter"].dtype == torch.float32
    start = sample["step_offset"]
    read = dataset.store.read(dataset.videos[1], layers=(LAST, *LAYERS), start=start,
                              stop=start + 64)  # float32, the old path
    assert torch.equal(moved["last"][0], torch.from_numpy(read[LAST]))
    for i, layer in enumerate(LAYERS):
        assert torch.equal(moved["inter"][0, i], torch.from_numpy(read[layer]))


def test_a_worker_collates_into_shared_memory_and_pads_with_zeros(fp16_files):
    dataset = training_set(*fp16_files, max_seq_len=200)  # longer than the videos: padding
    short = dataset[(0, 0)]
    short["last"], short["inter"] = short["last"][:50], short["inter"][:, :50]
    loader = torch.utils.data.DataLoader([[short, dataset[(0, 1)]]], batch_size=None,
                                         collate_fn=collate, num_workers=1)
    batch = next(iter(loader))
    assert batch["inter"].is_shared() and batch["last"].is_shared()  # no copy to reach us
    assert batch["mask"][0].sum() == 50 and batch["mask"][1].all()
    assert not batch["last"][0, 50:].any() and not batch["inter"][0, :, 50:].any()
    assert torch.equal(batch["inter"][0, :, :50], short["inter"])


def test_the_cache_holds_the_stored_bytes_and_serves_views(fp16_files):
    dataset = training_set(*fp16_files)
    plan = plan_cache("auto", split_bytes(dataset.store, dataset.videos, LAYERS), CPU)
    assert plan.kind == "ram" and "cached in RAM" in plan.message()
    cache = build_cache(dataset.store, dataset.videos, LAYERS, plan.kind, CPU)
    held = sum(t.nbytes for pair in cache.values() for t in pair)
    assert held == plan.nbytes == 4 * 120 * (1 + 2 * 2) * 16 * 2  # videos x clips x ... x fp16
    uncached = [dataset[(epoch, i)] for epoch in range(3) for i in range(len(dataset))]
    dataset.cache = cache
    for epoch in range(3):
        for i in range(len(dataset)):
            sample, reference = dataset[(epoch, i)], uncached[epoch * len(dataset) + i]
            assert sample["step_offset"] == reference["step_offset"]
            assert torch.equal(sample["inter"], reference["inter"])
            # A view into the cache: the only copy of a step is the one into its batch.
            assert sample["inter"].untyped_storage().data_ptr() == \
                cache[dataset.videos[i]][1].untyped_storage().data_ptr()


def test_channel_statistics_from_the_cache_equal_the_stores(fp16_files):
    """data.standardise reads the split once more: from the cache, no process rereads the store,
    and the statistics are the very same."""
    from training.cache import CachedReads
    from training.data import channel_statistics

    store = FeatureStore.open(fp16_files[0])
    videos, layers = store.videos(), list(store.layers)
    cache = build_cache(store, videos, layers, "ram", torch.device("cpu"))
    from_cache = channel_statistics(CachedReads(store, cache, layers), videos, layers)
    from_store = channel_statistics(store, videos, layers)
    assert from_cache.keys() == from_store.keys()
    assert all(np.array_equal(from_cache[key], from_store[key]) for key in from_store)


def test_auto_falls_back_to_the_store_when_memory_is_short(monkeypatch):
    monkeypatch.setattr(cache_module, "available_host_memory", lambda: 4 * 10 ** 9)
    plan = plan_cache("auto", 29 * 10 ** 9, CPU)
    assert plan.kind == "none"
    assert plan.message() == ("training features: 29.00 GB, not cached: read from the store "
                              "every step (data.cache = auto; more than 3.0 GB of host memory "
                              "(one copy per node))")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # eight ranks on the node share one copy
    assert plan_cache("auto", 2 * 10 ** 9, CPU).kind == "ram"
    with pytest.raises(InputError, match=r"data.cache: 'gpu' needs a CUDA device"):
        plan_cache("gpu", 10 ** 9, CPU)


def test_cached_and_persistent_worker_runs_give_the_store_runs_weights(fp16_files, tmp_path):
    """Two epochs through persistent workers reading the store (the epoch reaches them in the
    keys) and through the RAM cache end with bitwise the same weights."""
    store_path, annotations_path = fp16_files
    runs = {}
    for name, data in {"store": {"cache": "none", "num_workers": 2},
                       "cached": {"cache": "auto", "num_workers": 2}}.items():
        config = tiny_config(data={"max_seq_len": 64, **data},
                             train={"epochs": 2, "batch_size": 2, "micro_batch": 1})
        train(config, store_path, annotations_path, tmp_path / name, progress=False)
        runs[name] = final_weights(tmp_path / name)
        start = json.loads((tmp_path / name / "log.jsonl").read_text().splitlines()[0])
        assert ("cached in RAM" in start["cache"]) == (name == "cached")
    assert_same_state(runs["store"]["model"], runs["cached"]["model"])
    assert_same_state(runs["store"]["ema"], runs["cached"]["ema"])
    assert not np.allclose(runs["store"]["model"]["losa.gates"].numpy(), 1.0)  # it trained


def test_host_buffers_are_reused_only_once_nothing_views_them():
    from training.data import HostBuffers

    buffers = HostBuffers(limit=2)
    first = buffers.take((2, 3), torch.float16)
    address = first.data_ptr()
    assert buffers.take((2, 3), torch.float16).data_ptr() != address  # first is still held
    row = first[0]
    del first
    assert buffers.take((2, 3), torch.float16).data_ptr() != address  # a view still holds it
    del row
    smaller = buffers.take((1, 3), torch.float16)
    assert smaller.data_ptr() == address and smaller.shape == (1, 3)


def test_loader_bench_prints_its_figures_from_one_run():
    result = subprocess.run([sys.executable, str(REPO / "bench" / "loader.py"), "--dim", "32",
                             "--videos", "3", "--batches", "2", "--length", "256",
                             "--workers", "1"],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert "cached in RAM" in result.stdout
    match = re.fullmatch(r"loader: store ([\d.]+) GB/s, cached ([\d.]+) GB/s, memcpy floor "
                         r"([\d.]+) GB/s \(cached/floor ([\d.]+)\)", lines[-1])
    assert match, lines[-1]
    store, cached, floor, ratio = map(float, match.groups())
    assert min(store, cached, floor) > 0 and abs(ratio - cached / floor) < 0.01 + 0.01 * ratio
