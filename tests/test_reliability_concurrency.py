"""Reliability campaign, concurrency across stages (see docs/reliability.md).

Stage-two commands read a store while writer processes keep appending videos to it, two
importers fill one store at once, and two training runs are pointed at one run directory. Readers
must only ever see complete videos; no video may be lost or published twice; no run may silently
overwrite another.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import REPO, TESTS_DIR
from helpers.concurrency import CHUNK, CHUNKS, late_features, read_only_view
from store import LAST, FeatureStore

LATE_IDS = [f"late_{index:03d}" for index in range(8)]
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

WRITER = """
import json, sys
sys.path.insert(0, {tests!r})
from helpers.concurrency import append_videos
append_videos(sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3]))
"""


def start_writer(location, video_ids, pause):
    return subprocess.Popen(
        [sys.executable, "-c", WRITER.format(tests=str(TESTS_DIR)), str(location),
         json.dumps(video_ids), str(pause)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CHILD_ENV)


def check_complete_videos(location, snapshot: dict) -> list:
    """Open the store as a new reader and read every listed video whole: appended ones must equal
    what their writer published, the others must be unchanged. Returns the listed ids."""
    fs = FeatureStore.open(location)
    listed = fs.videos()
    for video_id in listed:
        read = fs.read(video_id, [LAST, *fs.layers])
        expected = snapshot.get(video_id) or late_features(video_id, fs.layers, fs.num_tokens,
                                                           fs.feature_dim)
        assert sorted(read, key=str) == sorted(expected, key=str), video_id
        for layer, values in expected.items():
            np.testing.assert_array_equal(read[layer], values, err_msg=f"{video_id} {layer}")
        assert len(fs.feature_times(video_id)) == len(expected[LAST])
    return listed


def finish(writers) -> list:
    """Wait for the writers; the (video id, published) pairs they printed."""
    published = []
    for writer in writers:
        out, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err[-2000:]
        published += [tuple(line.split()[1:]) for line in out.splitlines()
                      if line.startswith("published")]
    return published


@pytest.mark.slow
def test_training_and_inference_read_a_store_while_writers_append(tmp_path):
    from click.testing import CliRunner

    import cli
    from store.verify import verify_store
    from helpers.training import (synthetic_videos, tiny_config, write_annotations, write_config,
                                  write_store)

    videos = {**synthetic_videos(4, "training"), **synthetic_videos(2, "validation", first=4)}
    store = write_store(tmp_path / "store.zarr", videos)
    late = {vid: {"subset": "training", "times": (np.arange(CHUNK * CHUNKS) * 4 + 8) / 30.0,
                  "annotations": [{"segment": [1.0, 2.5], "label": "Jump"}]} for vid in LATE_IDS}
    annotations = write_annotations(tmp_path / "gt.json", {**videos, **late})
    config = write_config(tmp_path / "config.json", tiny_config(train={"epochs": 1}))
    first = FeatureStore.open(store)
    snapshot = {vid: first.read(vid, [LAST, *first.layers]) for vid in first.videos()}

    writers = [start_writer(store, LATE_IDS, pause=0.1) for _ in range(2)]
    while not any(vid in FeatureStore.open(store) for vid in LATE_IDS):
        assert all(writer.poll() is None for writer in writers), finish(writers)
        time.sleep(0.05)
    before = check_complete_videos(store, snapshot)
    runner = CliRunner()
    trained = runner.invoke(cli.main, ["train", "--config", config, "--store", store,
                                       "--annotations", annotations, "--out", tmp_path / "run",
                                       "--quiet"])
    assert trained.exit_code == 0, trained.output
    inferred = runner.invoke(cli.main, ["infer", "--run", tmp_path / "run", "--store", store,
                                        "--annotations", annotations, "--subset", "training",
                                        "--out", tmp_path / "preds.json", "--quiet"])
    assert inferred.exit_code == 0, inferred.output
    during = check_complete_videos(store, snapshot)
    assert len(before) < len(during) or any(w.poll() is None for w in writers), \
        "the writers finished before training started: nothing was tested"
    predicted = set(json.loads((tmp_path / "preds.json").read_text())["results"])
    assert set(videos) & predicted == {vid for vid in videos if videos[vid]["subset"] == "training"}
    assert predicted <= set(during)  # inference saw only published, complete videos

    while any(writer.poll() is None for writer in writers):
        check_complete_videos(store, snapshot)
        time.sleep(0.05)
    published = finish(writers)
    assert sorted(vid for vid, _ in published) == LATE_IDS  # each written by one writer, once
    assert all(ok == "True" for _, ok in published)
    assert check_complete_videos(store, snapshot) == sorted([*videos, *LATE_IDS])
    assert verify_store(FeatureStore.open(store)).bad == {}


def test_two_importers_fill_one_store_at_once(tmp_path):
    source = tmp_path / "features"
    source.mkdir()
    expected = {}
    for index in range(12):
        vid = f"video_{index:03d}"
        expected[vid] = np.random.default_rng(index).normal(size=(20 + index, 8)).astype(
            np.float32)
        np.save(source / f"{vid}.npy", expected[vid])
    store = tmp_path / "store.zarr"
    command = [sys.executable, str(REPO / "cli.py"), "store", "import", str(source), "--out",
               str(store), "--fps", "30"]
    importers = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=CHILD_ENV) for _ in range(2)]
    outputs = [importer.communicate(timeout=120) for importer in importers]
    assert [importer.returncode for importer in importers] == [0, 0], outputs
    fs = FeatureStore.open(store)
    assert fs.videos() == sorted(expected)
    for vid, values in expected.items():
        np.testing.assert_array_equal(fs.read(vid)[LAST], values)
    from store.verify import verify_store

    assert verify_store(fs).bad == {}


@pytest.mark.slow
def test_two_trainings_into_one_run_directory_do_not_both_write_it(tmp_path):
    """Two runs started on one --out at once would interleave log.jsonl and overwrite each
    other's checkpoints: one must refuse with a one-line error naming the directory."""
    from helpers.training import (synthetic_videos, tiny_config, write_annotations, write_config,
                                  write_store)

    videos = {**synthetic_videos(4, "training"), **synthetic_videos(1, "validation", first=4)}
    store = write_store(tmp_path / "store.zarr", videos)
    annotations = write_annotations(tmp_path / "gt.json", videos)
    config = write_config(tmp_path / "config.json", tiny_config(train={"epochs": 2}))
    run = tmp_path / "run"
    command = [sys.executable, str(REPO / "cli.py"), "train", "--config", str(config),
               "--store", str(store), "--annotations", str(annotations), "--out", str(run),
               "--quiet"]
    trainings = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=CHILD_ENV) for _ in range(2)]
    outputs = [training.communicate(timeout=300) for training in trainings]
    codes = sorted(training.returncode for training in trainings)
    assert codes == [0, 2], outputs
    refused = [err for (_, err), training in zip(outputs, trainings) if training.returncode == 2]
    lines = [line for line in refused[0].splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {run}"), refused[0][-2000:]
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r["event"] == "epoch"] == [1, 2]  # one run's records


READER = """
import sys, time
sys.path.insert(0, {tests!r})
from helpers.concurrency import read_while_appended
read_while_appended(sys.argv[1], float(sys.argv[2]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
def test_a_reader_without_write_access_reads_while_the_owner_appends(tmp_path, suffix):
    """A lab shares one store: the owner appends while a user who can only read it reads. Each
    of the user's reads must wait for a live writer and succeed (on HDF5 they all failed with
    'a writer died while appending': a journal being written was taken as a dead writer's)."""
    from helpers.training import synthetic_videos, write_store

    if subprocess.run([*read_only_view(tmp_path), "true"], capture_output=True).returncode:
        pytest.skip("no private mount namespace with a read-only bind mount here (unshare -rm)")
    shared = tmp_path / "shared"
    shared.mkdir()
    store = write_store(shared / f"store{suffix}", synthetic_videos(2, "training"))
    reader = subprocess.Popen(
        [*read_only_view(shared), sys.executable, "-c", READER.format(tests=str(TESTS_DIR)),
         str(store), "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=CHILD_ENV)
    writer = start_writer(store, LATE_IDS, pause=0.05)
    out, err = reader.communicate(timeout=120)
    finish([writer])
    assert reader.returncode == 0, err[-2000:]
    ok, failed, seen = map(int, out.splitlines()[-1].split()[1:])
    assert failed == 0, out[-2000:]
    assert ok > 10 and seen > 2, out  # it read many times while videos appeared
