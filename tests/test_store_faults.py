"""The store under faults: writers killed with SIGKILL mid-video and mid-publication, disk full
and read-only storage, several writers and a reader on one store at once.

Writers run as real child processes (``run_plan`` below) that print one line per step, so a kill
lands at a known point.
"""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from losa_tal import InputError
from store import LAST, FeatureStore
from store.verify import verify_store
from test_store import (as_stored, assert_video_equals, clip_times, make_meta, video_features,
                        video_info, write_video)

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
CHUNK = 10
PLAN = [("v0", 0, 30), ("v1", 1, 25), ("v2", 2, 30), ("v3", 3, 12)]


def run_plan(location, plan, pause=0.0, use_claims=True):
    """Write each (video id, seed, clips) of the plan CHUNK clips at a time, skipping videos that
    are done or claimed by another writer; one line on stdout per step."""
    fs = FeatureStore.create(location, make_meta())
    for video_id, seed, num_clips in plan:
        with (fs.claim(video_id) if use_claims else _always_mine()) as mine:
            if not mine or video_id in fs:
                continue
            features = video_features(seed, num_clips)
            with fs.video_writer(video_id, num_clips, video_info(num_clips)) as writer:
                for start in range(0, num_clips, CHUNK):
                    writer.write(start, {key: values[start:start + CHUNK]
                                         for key, values in features.items()})
                    print(f"chunk {video_id} {start}", flush=True)
                    time.sleep(pause)
                published = writer.commit(clip_times(num_clips))
            print(f"published {video_id} {published}", flush=True)
    fs.close()


class _always_mine:
    def __enter__(self):
        return True

    def __exit__(self, *exc):
        return False


CHILD = """
import json, sys
sys.path.insert(0, {tests!r})
{prelude}
from test_store_faults import run_plan
run_plan(sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "claims")
"""


def start_writer(location, plan=PLAN, pause=0.0, use_claims=True, prelude=""):
    script = CHILD.format(tests=TESTS_DIR, prelude=prelude)
    return subprocess.Popen(
        [sys.executable, "-c", script, str(location), json.dumps(plan), str(pause),
         "claims" if use_claims else "none"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_after(process, lines: int) -> list[str]:
    """SIGKILL the writer right after it printed ``lines`` lines; the lines it printed."""
    seen = []
    while len(seen) < lines:
        line = process.stdout.readline()
        assert line, f"writer ended early: {process.stderr.read()}"
        seen.append(line.split())
    process.send_signal(signal.SIGKILL)
    process.wait()
    return seen


def assert_plan_complete(location, plan=PLAN):
    fs = FeatureStore.open(location)
    assert fs.videos() == sorted(vid for vid, _, _ in plan)
    for video_id, seed, num_clips in plan:
        assert_video_equals(fs, video_id, video_features(seed, num_clips))
    report = verify_store(fs)
    assert report.bad == {}
    return report


def staging_entries(location) -> list[str]:
    staging = (os.path.join(location, ".writers", "staging") if not location.endswith(".h5")
               else location + ".writers/staging")
    return [name for name in os.listdir(staging) if not name.endswith(".lock")]


@pytest.fixture(params=["zarr", "hdf5"])
def location(request, tmp_path):
    return str(tmp_path / ("s.zarr" if request.param == "zarr" else "s.h5"))


# -- crashes ----------------------------------------------------------------------------------

# Kill points: inside the first video; between the first and the second; inside the third.
@pytest.mark.parametrize("lines", [2, 4, 9])
def test_sigkill_then_resume_equals_an_uninterrupted_run(location, lines):
    seen = kill_after(start_writer(location, pause=0.02), lines)
    published = [words[1] for words in seen if words[0] == "published"]
    in_progress = seen[-1][1] if seen[-1][0] == "chunk" else None

    # What a reader sees after the crash: exactly the published videos, all intact.
    fs = FeatureStore.open(location)
    assert fs.videos() == published
    assert verify_store(fs).bad == {}
    if in_progress is not None:
        assert in_progress not in fs and len(staging_entries(location)) == 1
        with fs.claim(in_progress) as mine:  # the dead writer's claim died with it
            assert mine

    run_plan(location, PLAN)  # the resume, as the user would rerun it
    assert_plan_complete(location)
    assert staging_entries(location) == []  # the dead writer's temporary was removed


HDF5_CRASH_IN_PUBLISH = """
import os, signal, h5py
_copy = h5py.Group.copy
def copy_then_die(self, source, dest, name=None, **kw):
    _copy(self, source, dest, name=name, **kw)
    if name == "v1":
        {before_death}
        os.kill(os.getpid(), signal.SIGKILL)
h5py.Group.copy = copy_then_die
"""


@pytest.mark.parametrize("before_death", ["pass", "self.file.flush()"])
def test_hdf5_writer_killed_inside_the_critical_section(tmp_path, before_death):
    location = str(tmp_path / "s.h5")
    prelude = HDF5_CRASH_IN_PUBLISH.format(before_death=before_death)
    writer = start_writer(location, prelude=prelude)
    writer.wait()
    assert writer.returncode == -signal.SIGKILL

    fs = FeatureStore.open(location)
    assert fs.videos() == ["v0"]  # v1 was copied (maybe even flushed) but never marked complete
    assert_video_equals(fs, "v0", video_features(0, 30))
    report = verify_store(fs)
    assert report.bad == {} and "while publishing 'v1'" in " ".join(report.notes)

    run_plan(location, PLAN)
    report = assert_plan_complete(location)
    assert report.notes == []


# -- disk full, read-only ---------------------------------------------------------------------

@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left on the device"),
                                         (errno.EDQUOT, "disk quota exceeded"),
                                         (errno.EROFS, "read-only file system")])
@pytest.mark.parametrize("failing_call", [1, 6])
def test_zarr_write_failure_is_one_clear_error_and_damages_nothing(
        tmp_path, monkeypatch, code, words, failing_call):
    import zarr.storage

    location = str(tmp_path / "s.zarr")
    fs = FeatureStore.create(location, make_meta())
    kept = write_video(fs, "kept", 0, 20)
    calls = []
    original_set = zarr.storage.LocalStore.set

    async def failing_set(self, key, value):
        calls.append(key)
        if len(calls) >= failing_call:
            raise OSError(code, os.strerror(code))
        return await original_set(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", failing_set)
    with pytest.raises(InputError) as caught:
        write_video(fs, "new", 1, 20)
    message = str(caught.value)
    assert message.startswith(location) and words in message and "'new'" in message
    assert staging_entries(location) == [] and "new" not in fs

    monkeypatch.undo()  # space is back: the same run continues
    write_video(fs, "new", 1, 20)
    reader = FeatureStore.open(location)
    assert_video_equals(reader, "kept", kept)
    assert_video_equals(reader, "new", video_features(1, 20))


def test_zarr_publish_failure(tmp_path, monkeypatch):
    location = str(tmp_path / "s.zarr")
    fs = FeatureStore.create(location, make_meta())

    def refuse(*args):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "rename", refuse)
    with pytest.raises(InputError, match="cannot write video 'v'.*permission denied"):
        write_video(fs, "v", 0, 5)
    monkeypatch.undo()
    assert staging_entries(location) == [] and fs.videos() == []


@pytest.mark.parametrize("where", ["staging", "publish"])
def test_hdf5_write_failure_is_one_clear_error_and_damages_nothing(tmp_path, monkeypatch, where):
    import h5py

    location = str(tmp_path / "s.h5")
    fs = FeatureStore.create(location, make_meta())
    kept = write_video(fs, "kept", 0, 20)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    target = (h5py.Dataset, "__setitem__") if where == "staging" else (h5py.Group, "copy")
    monkeypatch.setattr(*target, disk_full)
    with pytest.raises(InputError, match="cannot write video 'new'.*no space left on the device"):
        write_video(fs, "new", 1, 20)
    monkeypatch.undo()
    assert staging_entries(location) == []
    write_video(fs, "new", 1, 20)
    reader = FeatureStore.open(location)
    assert_video_equals(reader, "kept", kept)
    assert_video_equals(reader, "new", video_features(1, 20))


def _chmod_tree(path, writable: bool):
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chmod(os.path.join(root, name), 0o755 if writable or name in dirs else 0o444)
        os.chmod(root, 0o755 if writable else 0o555)


def _permissions_enforced(directory) -> bool:
    probe = os.path.join(directory, "probe")
    try:
        open(probe, "w").close()
    except PermissionError:
        return True
    os.unlink(probe)
    return False


def test_read_only_store_reads_and_refuses_writes_clearly(tmp_path, location):
    fs = FeatureStore.create(location, make_meta())
    kept = write_video(fs, "kept", 0, 12)
    fs.close()
    os.chmod(tmp_path, 0o555)
    _chmod_tree(location if os.path.isdir(location) else location + ".writers", writable=False)
    if os.path.isfile(location):
        os.chmod(location, 0o444)
    try:
        if not _permissions_enforced(str(tmp_path)):
            pytest.skip("permissions are not enforced for this user (root)")
        reader = FeatureStore.open(location)
        assert_video_equals(reader, "kept", kept)
        assert verify_store(reader).bad == {}
        writer = FeatureStore.create(location, make_meta())
        with pytest.raises(InputError, match="permission denied|read-only") as caught:
            with writer.claim("new") as mine:
                assert mine
                write_video(writer, "new", 1, 5)
        assert str(caught.value).startswith(location)
    finally:
        os.chmod(tmp_path, 0o755)
        _chmod_tree(location if os.path.isdir(location) else location + ".writers", writable=True)
        if os.path.isfile(location):
            os.chmod(location, 0o644)
    assert FeatureStore.open(location).videos() == ["kept"]


# -- concurrency ------------------------------------------------------------------------------

def test_three_writers_and_a_reader_on_one_new_store(location):
    """Three writers create one store at once and share the videos through claims; meanwhile a
    reader keeps listing and reading, and must only ever see complete, correct videos."""
    writers = [start_writer(location, pause=0.005) for _ in range(3)]
    expected = {vid: video_features(seed, num_clips) for vid, seed, num_clips in PLAN}
    seen, reads = set(), 0
    while True:
        finished = all(writer.poll() is not None for writer in writers)
        if os.path.isfile(location) or os.path.isfile(os.path.join(location, "zarr.json")):
            fs = FeatureStore.open(location)
            for video_id in fs.videos():
                assert_video_equals(fs, video_id, expected[video_id])
                seen.add(video_id)
                reads += 1
        if finished:
            break
        time.sleep(0.02)
    outputs = [writer.communicate() for writer in writers]
    assert all(writer.returncode == 0 for writer in writers), [err for _, err in outputs]
    published = [line.split()[1:] for out, _ in outputs for line in out.splitlines()
                 if line.startswith("published")]
    assert sorted(vid for vid, _ in published) == [vid for vid, _, _ in PLAN]  # once each
    assert seen == {vid for vid, _, _ in PLAN}
    assert_plan_complete(location)


def test_racing_writers_without_claims_keep_one_copy(tmp_path):
    """Two writers that do not claim write the same videos at once: one copy of each is
    published, the loser's is dropped, nothing is corrupted."""
    location = str(tmp_path / "s.zarr")
    writers = [start_writer(location, use_claims=False) for _ in range(2)]
    outputs = [writer.communicate() for writer in writers]
    assert all(writer.returncode == 0 for writer in writers), [err for _, err in outputs]
    results = [line.split()[1:] for out, _ in outputs for line in out.splitlines()
               if line.startswith("published")]
    for video_id, _, _ in PLAN:
        assert [result for vid, result in results if vid == video_id].count("True") == 1
    assert_plan_complete(location)
    assert staging_entries(location) == []


def test_a_live_writers_staging_is_not_cleaned_by_another(tmp_path):
    location = str(tmp_path / "s.zarr")
    first = FeatureStore.create(location, make_meta())
    with first.video_writer("v", 5, video_info(5)) as writer:
        writer.write(0, {key: values for key, values in video_features(0, 5).items()})
        FeatureStore.create(location, make_meta())  # cleans only dead writers' temporaries
        assert len(staging_entries(location)) == 1
        assert writer.commit(clip_times(5))
    np.testing.assert_array_equal(FeatureStore.open(location).read("v", [LAST])[LAST],
                                  as_stored(video_features(0, 5)[LAST]))
