#!/usr/bin/env python
"""Host syncs and seconds per training step of the demo config: this working tree against
another revision (default main), in one run.

Writes a small store of the demo's shapes (configs/demo/train.json on the demo backbone's
features: D 128, blocks 1 and 2 pooled to 2x2x2 tokens, 6 classes, 128-step windows; random
features, four actions per video) and exports the other revision with ``git archive``. For each
tree a child process trains on it with that tree's ``training.train.train`` and demo config,
watching ``Trainer._optimizer_step``: it counts the host syncs of one step
(tests/helpers/syncs.py; AdamW's host step counts excluded, see there) and times ``--steps``
others (CPU time of the process on the CPU, wall time on CUDA; data loading excluded). Rounds
alternate the trees, so both meet the same machine load; the figures are medians over all
rounds.

    python bench/host_syncs.py [--against main] [--models losa,head_only] [--steps 10]
                               [--rounds 3] [--threads 1] [--set KEY=VALUE ...]
"""
import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
COUNTER = ROOT / "tests" / "helpers" / "syncs.py"
DIM, LAYERS, TOKENS, CLASSES = 128, (1, 2), (2, 2, 2), 6
STEPS_PER_VIDEO = 160
TRAIN_VIDEOS = 8


def write_inputs(folder: Path, train_videos: int = TRAIN_VIDEOS, test_videos: int = 2):
    """A store of the demo's shapes and its annotations (subsets "train" and "test")."""
    sys.path.insert(0, str(ROOT))
    from store import LAST, FeatureStore

    rng = np.random.default_rng(0)
    store = FeatureStore.create(folder / "store.zarr", {
        "backbone": {"preset": None, "kwargs": {"embed_dim": DIM}, "checkpoint": None,
                     "random_init_seed": 0},
        "protocol": {"clip_len": 16, "frame_interval": 1, "clip_stride": 4},
        "layers": list(LAYERS), "tokens": list(TOKENS), "feature_dim": DIM, "dtype": "float32"})
    times = (np.arange(STEPS_PER_VIDEO) * 4 + 8) / 30.0
    database = {}
    for index in range(train_videos + test_videos):
        vid = f"video_{index:03d}"
        features = {LAST: rng.normal(size=(STEPS_PER_VIDEO, DIM)).astype(np.float32)}
        for layer in LAYERS:
            features[layer] = rng.normal(
                size=(STEPS_PER_VIDEO, int(np.prod(TOKENS)), DIM)).astype(np.float32)
        duration = float(times[-1] + 0.3)
        store.write_video(vid, features, times, {"fps": 30.0, "duration": duration})
        starts = np.sort(rng.uniform(0, duration - 3, size=4))
        database[vid] = {
            "subset": "train" if index < train_videos else "test", "duration": duration,
            "annotations": [{"segment": [round(s, 2), round(s + rng.uniform(0.5, 3), 2)],
                             "label": f"class_{rng.integers(CLASSES)}"} for s in starts]}
    annotations = folder / "annotations.json"
    annotations.write_text(json.dumps({"database": database}))
    return folder / "store.zarr", annotations


def worker(args) -> dict:
    """In a child process whose imports come from ``args.worker`` (a tree): ``train`` for
    enough epochs, its optimizer steps watched (the first one untimed: first-call
    allocations; the second one counted)."""
    import torch

    from training.config import load_config
    from training.train import Trainer, train

    torch.set_num_threads(args.threads)
    spec = importlib.util.spec_from_file_location("host_sync_counter", COUNTER)
    counter = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(counter)

    config = load_config(Path(args.worker) / "configs" / "demo" / "train.json",
                         [f"model.type={args.model}", *args.overrides])
    epochs = -(-(args.steps + 2) // (TRAIN_VIDEOS // config.train.batch_size))
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=epochs))
    step, seen = Trainer._optimizer_step, {"times": [], "syncs": None, "group": None}

    def watched(self, epoch, step_in_epoch, micro_batches):
        # On the CPU the process's CPU time: on a shared machine it hardly depends on the
        # load (one thread); on CUDA wall time, which is what the syncs cost.
        cuda = self.world.device.type == "cuda"
        clock = time.perf_counter if cuda else time.process_time
        started = clock()
        if len(seen["times"]) == 1 and seen["syncs"] is None:
            with counter.SyncCounter() as syncs:
                loss = step(self, epoch, step_in_epoch, micro_batches)
            seen["syncs"] = [e for e in syncs.events if not counter.reads_optimizer_step_counts(e)]
        else:
            loss = step(self, epoch, step_in_epoch, micro_batches)
            if cuda:
                torch.cuda.synchronize(self.world.device)
            seen["times"].append(clock() - started)
        seen["group"] = ([len(b["samples"]) for b in micro_batches], str(self.world.device))
        return loss

    Trainer._optimizer_step = watched
    with tempfile.TemporaryDirectory() as out:
        train(config, args.store, args.annotations, Path(out) / "run", progress=False)
    sizes, device = seen["group"]
    return {"syncs": len(seen["syncs"]), "micro_batches": len(sizes), "videos": sum(sizes),
            "device": device, "seconds": statistics.median(seen["times"][1:args.steps + 1])}


def run_worker(tree: Path, model: str, store, annotations, args) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(tree),
               "--model", model, "--store", str(store), "--annotations", str(annotations),
               "--steps", str(args.steps), "--threads", str(args.threads)]
    for item in args.overrides:
        command += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONWARNINGS": "ignore",
           "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, env=env, cwd=tree, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{tree}: the step failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", default="main", help="git revision to compare with")
    parser.add_argument("--models", default="losa,head_only")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="config override, as for cli.py train")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--annotations", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        other = folder / "against"
        other.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.against],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(other)], input=archive, check=True)
        store, annotations = write_inputs(folder)
        trees = {args.against: other, "this tree": ROOT}
        print(f"demo config {' '.join(args.overrides)}".strip() + f", {args.threads} thread(s), "
              f"{args.steps} steps x {args.rounds} rounds per tree")
        for model in args.models.split(","):
            results = {name: [] for name in trees}
            for _ in range(args.rounds):
                for name, tree in trees.items():
                    results[name].append(run_worker(tree, model, store, annotations, args))
            before, after = (results[name] for name in trees)
            first = after[0]
            rounds = [sorted(r["seconds"] for r in rs) for rs in (before, after)]
            seconds = [statistics.median(r) for r in rounds]
            spread = [f"{s:.4f} ({r[0]:.4f}-{r[-1]:.4f})" for s, r in zip(seconds, rounds)]
            print(f"{model} on {first['device']}, {first['micro_batches']} micro-batches of "
                  f"{first['videos'] // first['micro_batches']} videos per step: host syncs per "
                  f"step {before[0]['syncs']} -> {first['syncs']}; seconds per step, median "
                  f"(range) of the rounds: {spread[0]} -> {spread[1]}, ratio "
                  f"{seconds[1] / seconds[0]:.2f}")


if __name__ == "__main__":
    main()
