#!/usr/bin/env python
"""How fast does the training DataLoader deliver features, from the store and from the cache?

With no argument it writes a store of the default ViT-g layout (configs/datasets/thumos.json:
D 1408, blocks 7, 15, 23, 31 pooled to 2x2x2 tokens, float16) to a temporary folder, a few
videos a little longer than the training window (configs/train/thumos_vitg_losa.json: 2304
steps, batch 2), and times the training's own DataLoader (``training.data.training_loader``)
over the training batches: once reading the store (``data.cache: none``, the config's
workers) and once from the in-memory cache (``auto``: GPU or pinned memory on CUDA, RAM on the
CPU). Delivered means the batch's feature tensors are ready on the training device (on CUDA the
copy to it is included and synchronised). The same run measures a memcpy floor: one host
``copy_`` of a batch-sized buffer, the best of 10 before and 10 after the loader runs. The last line reads

    loader: store X GB/s, cached Y GB/s, memcpy floor Z GB/s (cached/floor R)

The store is read just after it was written, so from the page cache: "store" is the cost of
decoding and checking the chunks, not of a disk.

    python bench/loader.py [--videos 4] [--dim 1408] [--tokens 2,2,2] [--layers 7,15,23,31]
                           [--batches 8] [--workers N] [--length 2304] [--device auto]
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evaluation import load_annotations  # noqa: E402
from extract.config import load_preset  # noqa: E402
from store import LAST, FeatureStore  # noqa: E402
from training.cache import build_cache, plan_cache, split_bytes  # noqa: E402
from training.config import load_config  # noqa: E402
from training.data import EpochBatches, StoreDataset, training_loader  # noqa: E402

CONFIG = ROOT / "configs" / "train" / "thumos_vitg_losa.json"
VITG_DIM = 1408


def parse_args(argv=None):
    preset = load_preset("thumos")  # the default ViT-g layout
    config = load_config(CONFIG)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--dim", type=int, default=VITG_DIM)
    parser.add_argument("--layers", default=",".join(map(str, preset.layers)))
    parser.add_argument("--tokens", default=",".join(map(str, preset.tokens)))
    parser.add_argument("--length", type=int, default=config.data.max_seq_len)
    parser.add_argument("--batch", type=int, default=config.train.micro_batch)
    parser.add_argument("--batches", type=int, default=8, help="timed batches per path")
    parser.add_argument("--workers", type=int, default=config.data.num_workers)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--store", type=Path, metavar="DIR",
                        help="read DIR/store.zarr and DIR/gt.json, written by this bench or by "
                             "bench/train.py's loader-fed epoch with the same layout, instead "
                             "of writing a store")
    return parser.parse_args(argv), config


def write_store(path, args, layers, tokens):
    """Random float16 features of the given layout; each video 1.05x the training window."""
    num_tokens = int(np.prod(tokens))
    meta = {"backbone": {"preset": "vit_g", "kwargs": {}, "checkpoint": None,
                         "random_init_seed": 0},
            "protocol": {"clip_len": 16, "frame_interval": 1, "clip_stride": 4},
            "layers": layers, "tokens": tokens, "feature_dim": args.dim, "dtype": "float16"}
    rng = np.random.default_rng(0)
    clips = int(args.length * 1.05)
    database = {}
    with FeatureStore.create(path / "store.zarr", meta) as store:
        for index in range(args.videos):
            vid = f"video_{index:03d}"
            features = {LAST: rng.standard_normal((clips, args.dim), np.float32)}
            for layer in layers:
                features[layer] = rng.standard_normal((clips, num_tokens, args.dim), np.float32)
            times = (np.arange(clips) * 4 + 8) / 30.0
            store.write_video(vid, features, times, {"fps": 30.0, "duration": times[-1] + 0.3})
            duration = float(times[-1] + 0.3)
            database[vid] = {"subset": "validation", "duration": duration, "annotations": [
                {"segment": [round(0.2 * duration, 2), round(0.5 * duration, 2)],
                 "label": "Jump"}]}
    (path / "gt.json").write_text(json.dumps({"database": database}))
    return path / "store.zarr", path / "gt.json"


def delivered_rate(dataset, device, cache_kind, batches, batch_size):
    """GB/s of features delivered on ``device`` by the training loader, after one warm-up
    batch (worker start-up, allocator growth)."""
    keys = [[(0, (b * batch_size + i) % len(dataset)) for i in range(batch_size)]
            for b in range(batches + 1)]
    loader = training_loader(dataset, EpochBatches(keys), device, cache_kind)
    nbytes, started = 0, None
    for number, batch in enumerate(loader):
        moved = {key: batch[key].to(device, non_blocking=True) for key in ("last", "inter")
                 if batch[key] is not None}
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if number == 0:
            started = time.perf_counter()
            continue
        nbytes += sum(t.nbytes for t in moved.values())
    return nbytes / (time.perf_counter() - started) / 1e9


def memcpy_floor(nbytes, repeats=10):
    """GB/s of one host copy of a batch-sized buffer (the best of ``repeats``; the machine may
    be shared, and a floor is what the copy can reach, not what it reaches on average)."""
    source = torch.ones(nbytes // 2, dtype=torch.float16)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - started)
    return nbytes / best / 1e9


def main(argv=None) -> dict:
    """Prints the figures (the module docstring) and returns them."""
    args, config = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    layers = [int(x) for x in args.layers.split(",")]
    tokens = [int(x) for x in args.tokens.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as folder:
        if args.store:
            store_path, gt_path = args.store / "store.zarr", args.store / "gt.json"
        else:
            started = time.perf_counter()
            store_path, gt_path = write_store(Path(folder), args, layers, tokens)
            print(f"wrote {args.videos} videos of the layout D {args.dim}, layers {layers}, "
                  f"tokens {tokens} in {time.perf_counter() - started:.1f} s", flush=True)
        config.data.num_workers = args.workers
        config.data.max_seq_len = args.length
        store = FeatureStore.open(store_path)
        dataset = StoreDataset(store, load_annotations(gt_path), "validation", ["Jump"], layers,
                               config.data, train=True)
        sample = dataset[(0, 0)]
        batch_bytes = args.batch * sum(sample[k].nbytes for k in ("last", "inter")
                                       if sample[k] is not None)
        floor_before = memcpy_floor(batch_bytes)
        store_rate = delivered_rate(dataset, device, "none", args.batches, args.batch)
        print(f"store: {store_rate:.2f} GB/s with {args.workers} workers on {device}", flush=True)

        plan = plan_cache("auto", split_bytes(store, dataset.videos, layers), device)
        started = time.perf_counter()
        dataset.cache = build_cache(store, dataset.videos, layers, plan.kind, device)
        print(f"{plan.message()}; built in {time.perf_counter() - started:.1f} s", flush=True)
        cached_rate = delivered_rate(dataset, device, plan.kind, args.batches, args.batch)
        floor = max(floor_before, memcpy_floor(batch_bytes))  # before and after: the best
    print(f"batch: {batch_bytes / 1e6:.0f} MB of features; device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}; "
          f"{os.cpu_count()} CPUs")
    print(f"loader: store {store_rate:.2f} GB/s, cached {cached_rate:.2f} GB/s, memcpy floor "
          f"{floor:.2f} GB/s (cached/floor {cached_rate / floor:.2f})")
    return {"store_gb_s": store_rate, "cached_gb_s": cached_rate, "floor_gb_s": floor,
            "batch_mb": batch_bytes / 1e6, "device": str(device)}


if __name__ == "__main__":
    main()
