"""One store written by many machines: each video committed exactly once without trusting locks.

"Nodes" are child processes on this machine whose file locks are made useless the way a cluster
file system makes them: ``flock`` that always succeeds (locks emulated per node, so every node
"holds" every lock) or that is refused with ENOSYS (Lustre without the ``flock`` option). They
write one plan of videos into one store at once, die with SIGKILL mid-video or between their last
write and their commit, race on one video, and run against an S3-compatible server (moto) on
127.0.0.1 that has no locks at all. In every case each video is committed exactly once, no
reader ever sees a partial video, and the finished store reads exactly like a one-process one.
"""
import json
import logging
import os
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner

import cli
from helpers import TESTS_DIR
from helpers.s3 import BUCKET, moto_server
from helpers.stores import (assert_video_equals, make_meta, uncommitted, video_features,
                            write_video)
from store import FeatureStore
from store.verify import verify_store

PLAN = [(f"v{i}", i, 12 + 3 * i) for i in range(6)]

# A node: writes the plan (skipping committed or claimed videos), one line per commit.
NODE = """
import errno, fcntl, json, os, signal, sys, time
sys.path.insert(0, {tests!r})
locks, kill_at = {locks!r}, {kill_at!r}
if locks == "fake":      # every flock succeeds: locks that do not span machines
    fcntl.flock = lambda fd, op: None
elif locks == "refused":  # flock refused, as on Lustre mounted without -o flock
    def refused(fd, op):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    fcntl.flock = refused
if kill_at == "before-commit":  # die after the last write, before the commit record exists
    import store.zarr_backend as backend
    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
    backend.ZarrBackend._commit = die
from helpers.stores import CHUNK, clip_times, make_meta, video_features, video_info
from store import FeatureStore
location, options, plan, pause = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), float(sys.argv[4])
fs = FeatureStore.create(location, make_meta(), storage_options=options or None)
print("ready", flush=True)
while len(sys.argv) > 5 and not os.path.exists(sys.argv[5]):  # a start line shared by nodes
    time.sleep(0.005)
for video_id, seed, num_clips in plan:
    with fs.claim(video_id) as mine:
        if not mine or video_id in fs:
            continue
        features = video_features(seed, num_clips)
        with fs.video_writer(video_id, num_clips, video_info(num_clips)) as writer:
            for start in range(0, num_clips, CHUNK):
                writer.write(start, {{key: values[start:start + CHUNK] for key, values in features.items()}})
                print(f"chunk {{video_id}} {{start}}", flush=True)
                time.sleep(pause)
            published = writer.commit(clip_times(num_clips))
        print(f"published {{video_id}} {{published}}", flush=True)
"""


def start_node(location, plan=PLAN, locks="fake", options=None, pause=0.0, kill_at=None,
               go=None):
    """A node; with ``go``, it opens the store, prints ``ready`` and waits for that file."""
    script = NODE.format(tests=str(TESTS_DIR), locks=locks, kill_at=kill_at)
    return subprocess.Popen(
        [sys.executable, "-W", "ignore", "-c", script, str(location), json.dumps(options or {}),
         json.dumps(plan), str(pause), *([str(go)] if go else [])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(nodes, timeout=240) -> list[list[str]]:
    """Each node's output lines, after checking that it ended well."""
    outputs = []
    for node in nodes:
        out, err = node.communicate(timeout=timeout)
        assert node.returncode == 0, err
        outputs.append(out.split("\n"))
    return outputs


def commits_per_video(outputs) -> dict:
    """How many nodes committed each video (``published <id> True``)."""
    counts = {}
    for lines in outputs:
        for line in lines:
            words = line.split()
            if words[:1] == ["published"] and words[2] == "True":
                counts[words[1]] = counts.get(words[1], 0) + 1
    return counts


def assert_store_is_the_plan(location, options=None, plan=PLAN):
    """Exactly the plan's videos, each with the features a one-process run writes; verify clean."""
    fs = FeatureStore.open(location, options)
    assert fs.videos() == sorted(video_id for video_id, _, _ in plan)
    for video_id, seed, num_clips in plan:
        assert_video_equals(fs, video_id, video_features(seed, num_clips))
    report = verify_store(fs)
    assert report.bad == {} and report.missing == []
    return fs


@pytest.mark.parametrize("locks", ["fake", "refused"])
def test_nodes_whose_locks_do_not_work_commit_each_video_once(tmp_path, locks):
    location = tmp_path / "s.zarr"
    nodes = [start_node(location, locks=locks, pause=0.002) for _ in range(3)]
    outputs = finish(nodes)
    assert commits_per_video(outputs) == {video_id: 1 for video_id, _, _ in PLAN}
    assert_store_is_the_plan(location)
    # Losers dropped their own attempts; nothing is left for gc but what a loser could not see.
    assert uncommitted(location) == []


def test_two_nodes_racing_on_one_video_keep_one_copy(tmp_path):
    """Both write the whole video (their locks do not see each other); one commit wins, the
    loser's commit returns False and its attempt is gone; readers never saw a partial video."""
    location = tmp_path / "s.zarr"
    FeatureStore.create(location, make_meta()).close()
    plan = [("race", 7, 40)]
    go = tmp_path / "go"
    # Both start writing at once (after both opened the store), and writing takes longer than
    # starting: neither can see the other's commit before it begins.
    nodes = [start_node(location, plan=plan, pause=0.05, go=go) for _ in range(2)]
    for node in nodes:
        assert node.stdout.readline() == "ready\n"
    go.touch()
    reader = FeatureStore.open(location)
    while any(node.poll() is None for node in nodes):
        for video_id in reader.videos():  # whatever is listed reads whole
            assert_video_equals(reader, video_id, video_features(7, 40))
    outputs = finish(nodes)
    published = [line for lines in outputs for line in lines if line.startswith("published")]
    assert sorted(published) == ["published race False", "published race True"]
    assert_store_is_the_plan(location, plan=plan)
    assert uncommitted(location) == []


@pytest.mark.parametrize("kill_at", ["mid-video", "before-commit"])
def test_a_node_killed_leaves_nothing_a_reader_sees_and_gc_clears_it(tmp_path, kill_at):
    location = tmp_path / "s.zarr"
    if kill_at == "mid-video":
        victim = start_node(location, pause=0.05)
        for line in victim.stdout:
            if line.startswith("chunk v1 "):
                break
        victim.send_signal(signal.SIGKILL)
    else:
        victim = start_node(location, kill_at=kill_at)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    fs = FeatureStore.open(location)
    assert "v1" not in fs and len(uncommitted(location)) == 1
    assert verify_store(fs).bad == {}

    # Another node (its locks useless) finishes the plan; the dead attempt is never touched.
    finish([start_node(location)])
    assert_store_is_the_plan(location)
    dead = uncommitted(location)
    assert len(dead) == 1

    runner = CliRunner()
    result = runner.invoke(cli.main, ["store", "gc", str(location)])
    assert result.exit_code == 0 and "0 leftover(s) older than 24h" in result.output
    result = runner.invoke(cli.main, ["store", "gc", str(location), "--older-than", "0s"])
    assert result.exit_code == 0 and f"would remove: {dead[0]}" in result.output
    assert uncommitted(location) == dead  # a dry run by default
    result = runner.invoke(cli.main, ["store", "gc", str(location), "--older-than", "0s",
                                      "--delete"])
    assert result.exit_code == 0 and f"removed: {dead[0]}" in result.output
    assert uncommitted(location) == []
    assert_store_is_the_plan(location)


@pytest.mark.slow
def test_resume_with_another_number_of_nodes(tmp_path):
    """Three nodes take every third video; one dies; two nodes with the halves finish."""
    location = tmp_path / "s.zarr"
    thirds = [PLAN[index::3] for index in range(3)]
    nodes = [start_node(location, plan=part, pause=0.03) for part in thirds]
    for line in nodes[0].stdout:
        if line.startswith("chunk"):
            break
    nodes[0].send_signal(signal.SIGKILL)
    nodes[0].wait()
    finish(nodes[1:])
    finish([start_node(location, plan=PLAN[:3]), start_node(location, plan=PLAN[3:])])
    assert_store_is_the_plan(location)


# -- a store no writer can take over by accident ----------------------------------------------------
def test_an_existing_root_is_never_recreated(tmp_path):
    """A second writer starting on an existing store (even one whose first writer is done)
    keeps every committed video: the root is created only if absent."""
    location = tmp_path / "s.zarr"
    fs = FeatureStore.create(location, make_meta())
    features = write_video(fs, "kept", 0, 9)
    again = FeatureStore.create(location, make_meta())
    assert again.videos() == ["kept"]
    assert_video_equals(FeatureStore.open(location), "kept", features)


def test_the_plan_is_recorded_once_and_extended_by_new_ids(tmp_path):
    location = tmp_path / "s.zarr"
    first = FeatureStore.create(location, make_meta())
    second = FeatureStore.create(location, make_meta())
    plan = first.record_plan([{"video_id": "a", "duration": 3.0}, {"video_id": "b"}])
    # A second writer with another idea of "a" and a new video "c": the store's "a" wins.
    agreed = second.record_plan([{"video_id": "a", "duration": 9.0}, {"video_id": "c"}])
    assert [entry["video_id"] for entry in agreed] == ["a", "b", "c"]
    assert agreed[0]["duration"] == 3.0 and plan == agreed[:2]
    assert FeatureStore.open(location).planned_videos() == agreed
    write_video(first, "a", 0, 5)
    report = verify_store(FeatureStore.open(location))
    assert report.missing == ["b", "c"] and not report.clean
    result = CliRunner().invoke(cli.main, ["store", "verify", str(location)])
    assert result.exit_code == 1
    assert "missing: b: planned, not committed" in result.output
    assert "1 video(s) checked, 0 bad, 2 planned but missing" in result.output


def test_hdf5_records_a_plan_inside_its_file(tmp_path):
    location = tmp_path / "s.h5"
    fs = FeatureStore.create(location, make_meta())
    fs.record_plan([{"video_id": "a"}])
    fs.record_plan([{"video_id": "a"}, {"video_id": "b"}])
    assert [entry["video_id"] for entry in FeatureStore.open(location).planned_videos()] == \
        ["a", "b"]
    assert sorted(os.listdir(tmp_path)) == ["s.h5", "s.h5.writers"]


# -- format-1 stores ---------------------------------------------------------------------------------
def make_format_1_store(location) -> dict:
    """A store as the previous release wrote it: videos/<name> groups marked complete."""
    import zarr

    meta = {**make_meta(), "format_version": 1, "dtype": "float16", "software_version": "0.1.0",
            "created": "2026-11-01T00:00:00+00:00"}
    root = zarr.open_group(str(location), mode="w", attributes={"losa_tal": meta})
    features = {}
    for video_id, seed, num_clips in PLAN[:2]:
        features[video_id] = video_features(seed, num_clips)
        group = root.create_group(f"videos/{video_id}")
        for layer, values in features[video_id].items():
            key = "last" if layer == "last" else f"layer_{layer}"
            group.create_array(key, data=values.astype("float16"))
        from helpers.stores import clip_times, video_info

        group.create_array("times", data=clip_times(num_clips))
        group.attrs.update({**video_info(num_clips), "video_id": video_id,
                            "num_clips": num_clips, "float32_layers": [], "complete": True})
    root.create_group("videos/unfinished")  # a dead writer's group: no marker
    return features


def test_a_format_1_store_reads_is_refused_for_writing_and_upgrades_in_place(tmp_path):
    location = tmp_path / "old.zarr"
    features = make_format_1_store(location)
    fs = FeatureStore.open(location)
    assert fs.videos() == ["v0", "v1"] and fs.incomplete_videos() == ["unfinished"]
    assert_video_equals(fs, "v0", features["v0"])

    result = CliRunner().invoke(cli.main, ["store", "info", str(location)])
    assert result.exit_code == 0 and "format 1" in result.output
    with pytest.raises(Exception, match="format-1 layout.*store upgrade"):
        FeatureStore.create(location, make_meta())

    result = CliRunner().invoke(cli.main, ["store", "upgrade", str(location)])
    assert result.exit_code == 0 and "format 2, 2 video(s) carried over" in result.output
    fs = FeatureStore.create(location, make_meta())
    assert fs.meta["format_version"] == 2 and fs.videos() == ["v0", "v1"]
    write_video(fs, "v9", 9, 5)
    reader = FeatureStore.open(location)
    assert reader.videos() == ["v0", "v1", "v9"]
    for video_id in ("v0", "v1"):
        assert_video_equals(reader, video_id, features[video_id])
    assert verify_store(reader).bad == {}
    result = CliRunner().invoke(cli.main, ["store", "upgrade", str(location)])
    assert "already format 2" in result.output


# -- object storage (moto on 127.0.0.1) -------------------------------------------------------------
@pytest.fixture
def s3(monkeypatch):
    with moto_server(monkeypatch) as options:
        yield options


@pytest.mark.slow
def test_s3_nodes_commit_each_video_once(s3):
    """No locks at all: three nodes write the same plan; conditional creates decide."""
    location = f"s3://{BUCKET}/cluster.zarr"
    outputs = finish([start_node(location, options=s3, pause=0.002) for _ in range(3)])
    assert commits_per_video(outputs) == {video_id: 1 for video_id, _, _ in PLAN}
    assert_store_is_the_plan(location, s3)


@pytest.mark.slow
def test_s3_node_killed_before_commit_then_resumed(s3):
    location = f"s3://{BUCKET}/killed.zarr"
    victim = start_node(location, options=s3, kill_at="before-commit")
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    fs = FeatureStore.open(location, s3)
    assert fs.videos() == [] and fs.incomplete_videos() == ["v0"]
    finish([start_node(location, options=s3)])
    assert_store_is_the_plan(location, s3)
    old = FeatureStore.open(location, s3, writable=True).leftovers(0)
    assert [path.split("/")[:2] for path, _ in old] == [["attempts", "v0"]]


def test_a_server_that_ignores_conditional_creates_is_refused(s3, monkeypatch):
    """A second conditional create that succeeds means the server ignores If-None-Match: two
    writers could then overwrite one commit, so the store refuses to be written there."""
    import s3fs

    original = s3fs.S3FileSystem._pipe_file

    async def ignoring(self, path, data, mode="overwrite", **kwargs):
        return await original(self, path, data, **kwargs)  # drops mode="create"

    monkeypatch.setattr(s3fs.S3FileSystem, "_pipe_file", ignoring)
    with pytest.raises(Exception, match="cannot create a file only if it is absent"):
        FeatureStore.create(f"s3://{BUCKET}/x.zarr", make_meta(), storage_options=s3)
    fs = FeatureStore.create(f"s3://{BUCKET}/x.zarr", make_meta(), storage_options=s3,
                             single_writer=True)
    write_video(fs, "v", 0, 5)
    assert FeatureStore.open(f"s3://{BUCKET}/x.zarr", s3).videos() == ["v"]


class RequestCounter(logging.Handler):
    """Counts the requests moto's server logs (one werkzeug record per request)."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.mark.parametrize("count", [4, pytest.param(40, marks=pytest.mark.slow)])
def test_listing_an_s3_store_costs_the_same_for_any_number_of_videos(s3, count):
    location = f"s3://{BUCKET}/many.zarr"
    fs = FeatureStore.create(location, make_meta(), storage_options=s3)
    for index in range(count):
        write_video(fs, f"v{index:03d}", index, 2)
    counter = RequestCounter()
    logger = logging.getLogger("werkzeug")
    logger.addHandler(counter)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        reader = FeatureStore.open(location, s3)
        assert len(reader.videos()) == count
    finally:
        logger.removeHandler(counter)
        logger.setLevel(level)
    requests = [line for line in counter.lines if '"GET ' in line or '"HEAD ' in line]
    assert len(requests) <= 3, requests  # the root document and one listing


def test_a_run_directory_on_a_file_system_that_refuses_locks_is_used_with_a_warning(
        tmp_path, monkeypatch):
    """Lustre without -o flock refuses flock with ENOSYS: training warns and goes on (the
    lock only guards against a second run on the same directory)."""
    import errno
    import fcntl
    from types import SimpleNamespace

    from training.train import exclusive_run_directory

    def refused(fd, operation):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(fcntl, "flock", refused)
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="file locks are refused here"):
        with exclusive_run_directory(run, SimpleNamespace(is_main=True)):
            (run / "log.jsonl").write_text("{}\n")
    assert (run / "log.jsonl").exists()
