"""Reliability campaign, determinism of stage two on CPU (see docs/reliability.md).

tests/test_training.py already shows that one seed gives the same weights twice in one process,
that a run killed mid-epoch resumes to the uninterrupted weights, and that two DDP processes
give the weights of one. Here the same training runs as two separate command-line processes
with different Python hash seeds (set and dict orders differ): the checkpoints must be equal
bit for bit, and so must the mAP of every evaluation the runs logged.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO
from helpers.training import (synthetic_videos, tiny_config, write_annotations, write_config,
                              write_store)


def cli(*args, hash_seed):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONHASHSEED": str(hash_seed)}
    result = subprocess.run([sys.executable, str(REPO / "cli.py"), *map(str, args)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.mark.slow
def test_same_seed_in_two_processes_gives_identical_weights_and_map(tmp_path):
    videos = {**synthetic_videos(4, "training"), **synthetic_videos(2, "validation", first=4)}
    store = write_store(tmp_path / "store.zarr", videos)
    annotations = write_annotations(tmp_path / "gt.json", videos)
    config = write_config(tmp_path / "config.json", tiny_config(
        train={"epochs": 2, "seed": 7}, eval={"every": 1}))
    runs = [tmp_path / "a", tmp_path / "b"]
    for hash_seed, run in enumerate(runs):
        cli("train", "--config", config, "--store", store, "--annotations", annotations,
            "--out", run, "--quiet", hash_seed=hash_seed)
    a, b = runs
    for checkpoint in ("last.pt", "best.pt"):
        first = torch.load(a / checkpoint, weights_only=True)
        second = torch.load(b / checkpoint, weights_only=True)
        for part in ("model", "ema", "optimizer"):
            assert_same_tree(first[part], second[part])
        assert first["best"] == second["best"] and first["step"] == second["step"]
    evaluations = [[(r["epoch"], r["average_map"], r["map"]) for r in map(
        json.loads, (run / "log.jsonl").read_text().splitlines()) if r["event"] == "eval"]
        for run in runs]
    assert len(evaluations[0]) == 2 and evaluations[0] == evaluations[1]


def assert_same_tree(a, b):
    """Nested dicts/lists of tensors and plain values, equal bit for bit."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_tree(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tree(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b
