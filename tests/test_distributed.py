"""Collectives on the rank's device, and evaluation sharded across ranks.

No GPU is lent to this project, so NCCL's rule (CUDA tensors only) is enforced by wrapping the
collectives: the wrapper refuses a tensor that is not on the world's device with NCCL's own
message. Under ``FakeTensorMode`` the world's device is a fake ``cuda:0``, so a helper that left a
tensor on the CPU fails here as it would on a GPU node; real two-process gloo groups on
127.0.0.1 then check that sharded evaluation gives the predictions of one process.
"""
from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch._subclasses.fake_tensor import FakeTensorMode

import losa_distributed as distributed
from helpers import REPO
from losa_distributed import World

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce",
               "gather", "scatter", "reduce_scatter", "all_to_all", "barrier")
PICKLING = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list")


def tensors_in(args):
    for arg in args:
        if isinstance(arg, torch.Tensor):
            yield arg
        elif isinstance(arg, (list, tuple)):
            yield from tensors_in(arg)


def wrap_collectives(monkeypatch, device, calls, emulate=False):
    """Replace the collectives with ones that refuse tensors off ``device`` (as NCCL does) and
    record each call; ``emulate`` skips the real call (no process group, fake tensors)."""
    def checked(name, real):
        def collective(*args, **kwargs):
            for tensor in tensors_in([*args, *kwargs.values()]):
                if tensor.device != device:
                    raise RuntimeError(f"{name}: No backend type associated with device type "
                                       f"{tensor.device.type} (the group serves {device})")
            calls.append(name)
            return None if emulate else real(*args, **kwargs)
        return collective

    for name in COLLECTIVES:
        monkeypatch.setattr(dist, name, checked(name, getattr(dist, name)))
    for name in PICKLING:  # they unpickle what other processes send
        monkeypatch.setattr(dist, name, lambda *a, _name=name, **k: pytest.fail(f"{_name} pickles"))


def test_helpers_hand_collectives_tensors_on_the_ranks_cuda_device(monkeypatch):
    cuda = torch.device("cuda", 0)
    world = World(rank=0, size=2, device=cuda, joined=True)
    calls = []
    wrap_collectives(monkeypatch, cuda, calls, emulate=True)
    with FakeTensorMode(allow_non_fake_inputs=True):
        total = distributed.sum_across(world, torch.zeros(2, dtype=torch.float64))  # a CPU input
        parts = distributed.gather_tensors(world, torch.arange(3))
        distributed.barrier(world)
    assert total.device == cuda and all(part.device == cuda for part in parts)
    assert calls == ["all_reduce", "all_gather", "barrier"]


def test_the_wrapper_fails_on_a_cpu_tensor_as_nccl_does(monkeypatch):
    """The check above can fail: the old from_main broadcast a CPU tensor."""
    cuda = torch.device("cuda", 0)
    wrap_collectives(monkeypatch, cuda, [], emulate=True)
    with FakeTensorMode(allow_non_fake_inputs=True):
        with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
            dist.broadcast(torch.tensor([0.0], dtype=torch.float64), src=0)


def test_only_losa_distributed_calls_collectives():
    """So the device rule above covers every collective the project uses."""
    pattern = re.compile(r"\bdist\.(%s)\(" % "|".join(COLLECTIVES + PICKLING))
    offenders = [str(path.relative_to(REPO)) for folder in ("training", "adapt", "head",
                                                            "extract", "evaluation", "store")
                 for path in (REPO / folder).rglob("*.py") if pattern.search(path.read_text())]
    assert offenders == []


# ---------------------------------------------------------------------------------------------
# Sharded evaluation in real gloo groups.

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def predict_on_rank(rank, size, port, store_path, annotations_path, out_dir):
    """One rank of a gloo group: predict the validation split with a seeded random detector,
    with the collectives checked for the rank's device."""
    import os

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size)
    try:
        calls = []
        with pytest.MonkeyPatch.context() as monkeypatch:
            wrap_collectives(monkeypatch, torch.device("cpu"), calls)
            world = World(rank=rank, size=size, device=torch.device("cpu"), joined=True)
            predictions, pieces = seeded_predictions(store_path, annotations_path, world)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(
            {"predictions": predictions, "pieces": pieces, "calls": calls, "pid": os.getpid()}))
    finally:
        dist.destroy_process_group()


def seeded_predictions(store_path, annotations_path, world):
    """Predictions of a seeded random detector, and how many pieces this process ran."""
    from helpers.training import tiny_config
    from training.data import StoreDataset
    from training.detector import Detector
    from training.infer import predict
    from training.inputs import open_annotations, open_store

    config = tiny_config(data={"infer_window": 40, "infer_overlap": 0.25},
                         eval={"score_threshold": 0.0, "max_segments": 50})
    store, annotations = open_store(store_path, "thumos"), open_annotations(annotations_path)
    classes = list(annotations.classes)
    dataset = StoreDataset(store, annotations, "validation", classes, list(store.layers),
                           config.data, train=False)
    torch.manual_seed(0)
    model = Detector(store.feature_dim, len(classes), len(store.layers), store.num_tokens,
                     config.model, config.head)
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    return predict(model, dataset, config.postprocess, "cpu", classes, world=world), len(forwards)


@pytest.fixture(scope="module")
def five_video_store(tmp_path_factory):
    from helpers.training import synthetic_videos, write_annotations, write_store

    root = tmp_path_factory.mktemp("sharded")
    videos = {**synthetic_videos(2, "training"), **synthetic_videos(5, "validation", first=2)}
    return write_store(root / "store.zarr", videos), write_annotations(root / "gt.json", videos)


@pytest.mark.slow
@pytest.mark.parametrize("size", [2, 3])
def test_sharded_evaluation_gives_the_predictions_of_one_process(five_video_store, tmp_path,
                                                                 size):
    store_path, annotations_path = five_video_store
    alone, pieces = seeded_predictions(store_path, annotations_path, World())
    assert sum(len(v) for v in alone["results"].values()) > 0
    mp.start_processes(predict_on_rank, args=(size, free_port(), store_path, annotations_path,
                                              tmp_path), nprocs=size, start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(size)]
    for rank in ranks:
        assert rank["predictions"] == alone  # every rank holds every video's detections
        assert rank["calls"] == ["all_gather", "all_gather"]  # sizes, then the JSON bytes
    assert list(ranks[0]["predictions"]["results"]) == list(alone["results"])  # video order
    assert len({rank["pid"] for rank in ranks}) == size
    # Each rank ran only its share of the pieces, and together all of them once.
    assert sum(rank["pieces"] for rank in ranks) == pieces
    assert max(rank["pieces"] for rank in ranks) < pieces
    assert np.isfinite([d["score"] for v in alone["results"].values() for d in v]).all()
