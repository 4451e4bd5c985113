"""The shipped recipes under torchrun: they start on any number of processes, share the global
batch, and give the one-process weights wherever their micro-batches are the same; the ranks
agree on their devices and their run directory; the training cache is built once per node.

Real torchrun launches (gloo on 127.0.0.1) of ``cli.py train`` from the shipped recipe files,
shrunk to a tiny model over small synthetic stores: only the model sizes are replaced, the
``train`` section (global batch and micro-batch) is the recipe's own.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from helpers import REPO
from helpers.training import (assert_same_state, final_weights, synthetic_videos, tiny_config,
                              write_annotations, write_store)
from losa_tal import InputError
from training.cache import CACHE_FOLDER
from training.config import load_config
from training.train import BatchShare, share_batch, train

RECIPES = {"thumos": REPO / "configs/train/thumos_vitg_losa.json",
           "anet": REPO / "configs/train/anet_vitg_losa.json",
           "demo": REPO / "configs/demo/train.json"}
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# How a global batch is shared (no processes needed).

@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("processes", [1, 2, 4, 8])
def test_every_shipped_recipe_starts_on_1_2_4_and_8_processes(recipe, processes):
    asked = load_config(RECIPES[recipe]).train
    share = share_batch(asked, processes)
    per_process = share.batch_size // processes
    assert share.batch_size % processes == 0 and share.batch_size >= asked.batch_size
    assert share.batch_size - asked.batch_size < processes  # the next multiple, no more
    assert share.micro_batch * share.accum_steps == per_process
    assert share.micro_batch <= asked.micro_batch
    # Nothing changes silently: one line per change, none without one.
    changed = [share.batch_size != asked.batch_size, share.micro_batch != asked.micro_batch]
    assert len(share.notes) == sum(changed)


def test_the_shares_of_the_shipped_recipes_and_their_notes():
    thumos, anet = load_config(RECIPES["thumos"]).train, load_config(RECIPES["anet"]).train
    assert share_batch(thumos, 1) == BatchShare(2, 2, 1, ())
    two = share_batch(thumos, 2)
    assert (two.batch_size, two.micro_batch, two.accum_steps) == (2, 1, 1)
    assert two.notes == ("train.micro_batch 2 -> 1: each of 2 processes takes 1 videos per step "
                         "(set train.micro_batch to a divisor of 1 to choose)",)
    eight = share_batch(thumos, 8)
    assert (eight.batch_size, eight.micro_batch, eight.accum_steps) == (8, 1, 1)
    assert eight.notes[0] == ("train.batch_size 2 -> 8: 8 processes take an equal share of the "
                              "global batch (learning rates unchanged; set train.batch_size to "
                              "a multiple of 8 to choose)")
    assert [(s.micro_batch, s.accum_steps) for s in (share_batch(anet, n) for n in (1, 2, 4, 8))] \
        == [(16, 1), (8, 1), (4, 1), (2, 1)]
    # A micro-batch that divides the share is kept: the one-process micro-batches, same result.
    smaller = load_config(RECIPES["anet"], ["train.micro_batch=4"]).train
    assert [(share.micro_batch, share.notes)
            for share in (share_batch(smaller, n) for n in (1, 2, 4))] == [(4, ())] * 3


# ---------------------------------------------------------------------------------------------
# Real torchrun runs of the shipped recipes.

TINY_SECTIONS = ("model", "head", "optim", "eval")


def shrunk_recipe(recipe: str, path, *overrides):
    """The recipe file with the tiny test model's sizes (its ``train`` section untouched),
    written to ``path``; learning rates from step 0 (no warmup) so that one epoch trains."""
    raw = json.loads(RECIPES[recipe].read_text())
    tiny = tiny_config(optim={"warmup_epochs": 0}).to_dict()
    for section in TINY_SECTIONS:
        raw[section] = {**raw.get(section, {}), **tiny[section]}
    raw["data"] = {**raw["data"], "num_workers": 0, "max_seq_len": 96, "resize_len": 96}
    raw["train"] = {**raw["train"], "epochs": 1}
    path.write_text(json.dumps(raw))
    return load_config(path, overrides)


@pytest.fixture(scope="module")
def recipe_files(tmp_path_factory):
    """32 training and 2 validation videos: two steps of ActivityNet's global batch of 16."""
    root = tmp_path_factory.mktemp("recipes")
    videos = {**synthetic_videos(32, "training"), **synthetic_videos(2, "validation", first=32)}
    return write_store(root / "store.zarr", videos), write_annotations(root / "gt.json", videos)


def torchrun_train(processes, config_path, files, out_dir, *overrides):
    store_path, annotations_path = files
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(processes), str(REPO / "cli.py"), "train",
               "--config", str(config_path), "--store", str(store_path),
               "--annotations", str(annotations_path), "--out", str(out_dir), "--quiet",
               *[f"--set={override}" for override in overrides]]
    result = subprocess.run(command, env=SUBPROCESS_ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def start_record(run_dir):
    return json.loads((run_dir / "log.jsonl").read_text().splitlines()[0])


def assert_same_run(a, b, exact):
    """Bit for bit where a step sums two micro-batches' gradients (a + b is b + a); with more,
    up to the order of the sums: one process accumulates ((g0 + g1) + g2) + g3, two processes
    all-reduce (g0 + g1) + (g2 + g3), and float addition is not associative."""
    one, other = final_weights(a), final_weights(b)
    for part in ("model", "ema"):
        if exact:
            assert_same_state(one[part], other[part])
        else:
            assert one[part].keys() == other[part].keys()
            for key, value in one[part].items():
                assert torch.allclose(value, other[part][key], rtol=1e-5, atol=1e-6), key
    trained = one["model"]["head.reg_scales.0.scale"]
    assert not torch.equal(trained, torch.ones_like(trained))  # it trained


def test_thumos_recipe_on_two_processes_shares_its_batch_as_one_process_would(dataset_files,
                                                                              tmp_path):
    """The representative: THUMOS's global batch of 2 in one micro-batch cannot be split by 2
    processes; each takes a micro-batch of 1, says so in one line, and the weights are those
    of one process accumulating two micro-batches of 1."""
    shrunk_recipe("thumos", tmp_path / "thumos.json")
    stderr = torchrun_train(2, tmp_path / "thumos.json", dataset_files, tmp_path / "two")
    notes = [line for line in stderr.splitlines() if line.startswith("train.")]
    assert notes == ["train.micro_batch 2 -> 1: each of 2 processes takes 1 videos per step "
                     "(set train.micro_batch to a divisor of 1 to choose)"]
    assert "rank 1/2: training on cpu" in stderr  # the device each rank really uses
    record = start_record(tmp_path / "two")
    assert (record["world_size"], record["micro_batch"], record["accum_steps"]) == (2, 1, 1)
    assert "cached in RAM" in record["cache"] and "one copy per node" in record["cache"]
    train(shrunk_recipe("thumos", tmp_path / "thumos.json", "train.micro_batch=1"),
          *dataset_files, tmp_path / "one", progress=False)
    assert_same_run(tmp_path / "one", tmp_path / "two", exact=True)


@pytest.mark.slow
def test_thumos_recipe_on_four_processes_raises_its_batch_and_says_so(dataset_files, tmp_path):
    shrunk_recipe("thumos", tmp_path / "thumos.json")
    stderr = torchrun_train(4, tmp_path / "thumos.json", dataset_files, tmp_path / "four")
    assert "train.batch_size 2 -> 4: 4 processes take an equal share" in stderr
    saved = json.loads((tmp_path / "four" / "config.json").read_text())
    assert saved["train"]["batch_size"] == 4  # what the run trained with, for its resume
    train(shrunk_recipe("thumos", tmp_path / "thumos.json", "train.batch_size=4",
                        "train.micro_batch=1"), *dataset_files, tmp_path / "one", progress=False)
    assert_same_run(tmp_path / "one", tmp_path / "four", exact=False)


@pytest.mark.slow
@pytest.mark.parametrize("processes", [2, 4])
def test_anet_recipe_gives_the_one_process_weights_on_2_and_4_processes(recipe_files, tmp_path,
                                                                        processes):
    """ActivityNet's global batch of 16 in micro-batches of 4: one process accumulates four,
    two processes two each, four processes one each; the weights are the same (see
    assert_same_run)."""
    shrunk_recipe("anet", tmp_path / "anet.json")
    stderr = torchrun_train(processes, tmp_path / "anet.json", recipe_files, tmp_path / "many",
                            "train.micro_batch=4")
    assert not [line for line in stderr.splitlines() if line.startswith("train.")]
    train(shrunk_recipe("anet", tmp_path / "anet.json", "train.micro_batch=4"), *recipe_files,
          tmp_path / "one", progress=False)
    assert_same_run(tmp_path / "one", tmp_path / "many", exact=False)


# ---------------------------------------------------------------------------------------------
# The ranks' agreement, in real gloo groups started without torchrun's launcher.

def as_rank(rank, size, port, function, *args):
    """Run ``function`` as rank ``rank`` of ``size`` on one node (torchrun's variables);
    an InputError is written to ``<out>/rank<rank>.json`` (args[-1] is the folder)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    out = args[-1]
    try:
        result = {"value": function(rank, *args)}
    except InputError as err:
        result = {"error": str(err)}
    (out / f"rank{rank}.json").write_text(json.dumps(result))


def run_ranks(size, function, *args):
    mp.start_processes(as_rank, args=(size, free_port(), function, *args), nprocs=size,
                       start_method="spawn")
    return [json.loads((args[-1] / f"rank{rank}.json").read_text()) for rank in range(size)]


def claim_device(rank, out):
    import losa_distributed

    # A device object needs no GPU: rank 0 claims CUDA, rank 1 has none.
    losa_distributed.agree_on_device(torch.device("cuda", 0) if rank == 0 else torch.device("cpu"),
                                     timeout_minutes=1)
    return "agreed"


@pytest.mark.slow
def test_a_rank_without_cuda_among_cuda_ranks_is_refused_on_every_rank(tmp_path):
    ranks = run_ranks(2, claim_device, tmp_path)
    message = ("ranks [1] found no CUDA device while the other 1 ranks use CUDA; check the GPUs "
               "and CUDA_VISIBLE_DEVICES on their nodes (or run every rank on the CPU)")
    assert ranks == [{"error": message}] * 2


def resume_in_own_folder(rank, config_path, files, out):
    """Each rank resumes ``run`` relative to its own folder: as on nodes that do not share the
    file system holding --out."""
    os.chdir(out / f"node{rank}")
    train(load_config(config_path), *files, "run", resume=True, progress=False)


@pytest.mark.slow
def test_a_resume_refuses_when_the_ranks_see_different_run_directories(dataset_files, tmp_path):
    config = tiny_config(train={"epochs": 2, "batch_size": 2, "micro_batch": 1})
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config.to_dict()))
    for rank in (0, 1):
        (tmp_path / f"node{rank}").mkdir()
    train(tiny_config(train={"epochs": 1, "batch_size": 2, "micro_batch": 1}), *dataset_files,
          tmp_path / "node0" / "run", progress=False)
    ranks = run_ranks(2, resume_in_own_folder, config_path, dataset_files, tmp_path)
    assert ranks == [{"error": "run: the ranks see different runs in it (rank 0: last.pt at "
                               "epoch 1; rank 1: no last.pt); give `out_dir` on a file system "
                               "every node shares"}] * 2
    assert torch.load(tmp_path / "node0" / "run" / "last.pt", weights_only=True)["epoch"] == 1


# ---------------------------------------------------------------------------------------------
# The training cache, once per node.

def node_cache(rank, store_path, layers, out):
    """This rank's cache through build_cache, as a digest per video, and the cache folder's
    entries of rank 0's owner after the build."""
    from store import FeatureStore
    from training.cache import build_cache, cache_folder

    store = FeatureStore.open(store_path)
    reads = []
    read = store.read
    store.read = lambda *a, **k: reads.append(a[0]) or read(*a, **k)
    cache = build_cache(store, store.videos(), layers, "ram", torch.device("cpu"),
                        timeout_minutes=1)
    folder = os.path.join(cache_folder(0), CACHE_FOLDER)
    leftovers = [name for name in os.listdir(folder) if name.startswith(f"{os.getpid()}-")]
    return {"reads": len(reads), "leftovers": leftovers,
            "mappings": cache_mappings(),
            "videos": digests(cache)}


def cache_mappings() -> list:
    """Permissions of this process's mappings of cache files (/proc/self/maps), e.g. r--s."""
    with open("/proc/self/maps") as maps:
        return sorted({line.split()[1] for line in maps if CACHE_FOLDER in line})


def digests(cache) -> dict:
    return {vid: [f"{t.dtype} {list(t.shape)} {hashlib.sha256(t.numpy().tobytes()).hexdigest()}"
                  for t in pair if t is not None] for vid, pair in cache.items()}


def killed_while_building() -> str:
    """The file of a builder SIGKILLed mid-build (its owner lock dies with it)."""
    from training.cache import cache_folder

    folder = os.path.join(cache_folder(0), CACHE_FOLDER)
    script = ("import os, sys, time; from store import locks; os.makedirs(sys.argv[1], "
              "exist_ok=True); area = locks.StagingArea(sys.argv[1]); path = "
              "area.new_path('.cache'); open(path, 'wb').write(b'x' * 4096); print(path, "
              "flush=True); time.sleep(60)")
    builder = subprocess.Popen([sys.executable, "-c", script, folder], stdout=subprocess.PIPE,
                               text=True, cwd=REPO, env=SUBPROCESS_ENV)
    path = builder.stdout.readline().strip()
    builder.kill()
    builder.wait()
    builder.stdout.close()
    assert os.path.exists(path)
    return path


@pytest.mark.slow
def test_the_cache_is_read_once_per_node_and_leaves_no_file(dataset_files, tmp_path):
    from store import FeatureStore
    from training.cache import build_cache

    store_path, _ = dataset_files
    store = FeatureStore.open(store_path)
    alone = build_cache(store, store.videos(), [1, 2], "ram", torch.device("cpu"))
    stale = killed_while_building()
    ranks = run_ranks(2, node_cache, store_path, [1, 2], tmp_path)
    assert not os.path.exists(stale)  # the next build on the node deleted it
    assert [rank["value"]["reads"] for rank in ranks] == [len(store.videos()), 0]
    assert [rank["value"]["leftovers"] for rank in ranks] == [[], []]
    # Both map the one file, rank 1 read-only, and the file is gone (unlinked, still mapped).
    assert [rank["value"]["mappings"] for rank in ranks] == [["rw-s"], ["r--s"]]
    assert ranks[0]["value"]["videos"] == ranks[1]["value"]["videos"] == digests(alone)
