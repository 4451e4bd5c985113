"""The store under faults: writers killed with SIGKILL mid-video and mid-publication, disk full
and read-only storage, several writers and a reader on one store at once.

Writers run as real child processes (``helpers.stores.run_plan``) that print one line per step,
so a kill lands at a known point.
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

from helpers import TESTS_DIR
from helpers.stores import (as_stored, assert_video_equals, clip_times, make_meta, run_plan,
                            uncommitted, video_features, video_info, write_video)
from losa_tal import InputError
from store import LAST, FeatureStore
from store.verify import verify_store

PLAN = [("v0", 0, 30), ("v1", 1, 25), ("v2", 2, 30), ("v3", 3, 12)]


CHILD = """
import json, sys
sys.path.insert(0, {tests!r})
{prelude}
from helpers.stores import run_plan
run_plan(sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "claims")
"""


def start_writer(location, plan=PLAN, pause=0.0, use_claims=True, prelude=""):
    script = CHILD.format(tests=str(TESTS_DIR), prelude=prelude)
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
        assert in_progress not in fs and len(uncommitted(location)) == 1
        with fs.claim(in_progress) as mine:  # the dead writer's claim died with it
            assert mine

    run_plan(location, PLAN)  # the resume, as the user would rerun it
    assert_plan_complete(location)
    # HDF5 (one machine, working locks) removes a dead writer's temporary itself; a Zarr
    # store never deletes another writer's data on a guess: `store gc` does, by age.
    # (Killed between videos, the next video's attempt may already have begun.)
    assert len(uncommitted(location)) <= (0 if location.endswith(".h5") else 1)
    fs = FeatureStore.create(location, make_meta())
    for path, _ in fs.leftovers(older_than=0):
        fs.remove_leftover(path)
    assert uncommitted(location) == []
    assert_plan_complete(location)


def test_sigkill_on_a_url_store_leaves_an_attempt_that_no_reader_sees(tmp_path):
    """Through a URL (fsspec) the same commit protocol holds: the dead writer's attempt stays
    invisible, the resume commits the video from a new attempt."""
    location = (tmp_path / "s.zarr").as_uri()
    kill_after(start_writer(location, pause=0.02), 6)  # inside v1
    fs = FeatureStore.open(location)
    assert fs.videos() == ["v0"] and fs.incomplete_videos() == ["v1"]
    report = verify_store(fs)
    assert report.bad == {} and "1 uncommitted video(s)" in report.notes[0]
    run_plan(location, PLAN)
    assert assert_plan_complete(location).notes == []


HDF5_CRASH_IN_PUBLISH = """
import os, signal, store.journal
journaled = store.journal.JournaledFile
_init, _method = journaled.__init__, getattr(journaled, {method!r})
publications, calls = [], []
def counting_init(self, *args):
    publications.append(self)
    _init(self, *args)
def then_die(self, *args):
    result = _method(self, *args)
    if len(publications) == 2:  # while publishing v1
        calls.append(1)
        if len(calls) == {call}:
            os.kill(os.getpid(), signal.SIGKILL)
    return result
journaled.__init__ = counting_init
setattr(journaled, {method!r}, then_die)
"""


# Publishing v1 into the file makes 23 writes; the 5th-7th and the last two overwrite existing
# bytes (the index and the superblock). Kill right after a write, or after its journal record
# and before the write itself.
@pytest.mark.parametrize("method, call", [("write", 6), ("_save", 22)])
def test_hdf5_writer_killed_while_appending_is_rolled_back(tmp_path, method, call):
    location = str(tmp_path / "s.h5")
    plan = PLAN[:2]
    writer = start_writer(location, plan, prelude=HDF5_CRASH_IN_PUBLISH.format(
        method=method, call=call))
    writer.wait()
    assert writer.returncode == -signal.SIGKILL
    assert os.path.exists(location + ".writers/publish.journal")

    with pytest.warns(UserWarning, match="rolled back the unfinished append"):
        fs = FeatureStore.open(location)
        assert fs.videos() == ["v0"]
    assert fs.incomplete_videos() == []  # v1 left no trace
    assert_video_equals(fs, "v0", video_features(0, 30))
    run_plan(location, plan)
    assert assert_plan_complete(location, plan).notes == []


def _publish_and_die_at_write(location, k: int) -> bool:
    """Publish one more video in a forked child that dies (like SIGKILL: no cleanup) right after
    the k-th write into the store file; True if it died, False if the append finished first."""
    import store.journal

    pid = os.fork()
    if pid == 0:  # the child
        try:
            write_count = []
            original_write = store.journal.JournaledFile.write

            def write_then_maybe_die(self, data):
                written = original_write(self, data)
                write_count.append(1)
                if len(write_count) == k:
                    os._exit(9)
                return written

            store.journal.JournaledFile.write = write_then_maybe_die
            write_video(FeatureStore.create(location, make_meta()), "new", 99, 20)
        finally:
            os._exit(0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 9


def test_hdf5_append_killed_after_any_write_is_rolled_back_byte_for_byte(tmp_path):
    """With 8 videos in the file, appending a 9th rewrites the group index in place; killed after
    its 5th write or any later one, plain HDF5 is left unreadable ("addr overflow", found by
    discarding the journal). Every kill point must leave the exact bytes we had before."""
    location = str(tmp_path / "s.h5")
    fs = FeatureStore.create(location, make_meta())
    kept = {f"v{i}": write_video(fs, f"v{i}", i, 5) for i in range(8)}
    fs.close()
    before = open(location, "rb").read()
    k = 0
    while True:
        k += 1
        if not _publish_and_die_at_write(location, k):
            break
        with pytest.warns(UserWarning, match="rolled back"):
            assert FeatureStore.open(location).videos() == sorted(kept)
        assert open(location, "rb").read() == before, f"killed after write {k}"
    assert k > 20  # the scan went through the whole append, which then completed
    reader = FeatureStore.open(location)
    assert reader.videos() == sorted([*kept, "new"])
    for vid, features in kept.items():
        assert_video_equals(reader, vid, features)


def test_journal_roll_back_restores_the_exact_bytes(tmp_path):
    from store.journal import JournaledFile, roll_back

    path, journal = str(tmp_path / "f"), str(tmp_path / "f.journal")
    original = np.random.default_rng(0).bytes(5000)
    (tmp_path / "f").write_bytes(original)
    handle = JournaledFile(path, journal)
    for offset, size in [(100, 50), (4990, 30), (120, 10), (0, 8), (6000, 100), (100, 50)]:
        handle.seek(offset)
        handle.write(b"x" * size)
    handle.truncate(3000)
    handle.seek(4000)
    handle.write(b"y" * 10)
    handle.close()
    with open(journal, "ab") as cut:
        cut.write(b"\0" * 20)  # a record cut short by the kill: ignored
    assert roll_back(path, journal) and not os.path.exists(journal)
    assert (tmp_path / "f").read_bytes() == original
    assert not roll_back(path, journal)


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
    assert uncommitted(location) == [] and "new" not in fs

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

    monkeypatch.setattr(os, "link", refuse)
    with pytest.raises(InputError, match="cannot write video 'v'.*permission denied"):
        write_video(fs, "v", 0, 5)
    monkeypatch.undo()
    assert uncommitted(location) == [] and fs.videos() == []


@pytest.mark.parametrize("where", ["staging", "publish"])
def test_hdf5_write_failure_is_one_clear_error_and_damages_nothing(tmp_path, monkeypatch, where):
    import h5py

    location = str(tmp_path / "s.h5")
    fs = FeatureStore.create(location, make_meta())
    kept = write_video(fs, "kept", 0, 20)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    target = (h5py.Dataset, "__setitem__") if where == "staging" else (h5py.Group, "copy")
    before = open(location, "rb").read()
    monkeypatch.setattr(*target, disk_full)
    with pytest.raises(InputError, match="cannot write video 'new'.*no space left on the device"):
        write_video(fs, "new", 1, 20)
    monkeypatch.undo()
    assert open(location, "rb").read() == before  # a failed append is rolled back
    assert uncommitted(location) == []
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


def test_read_only_hdf5_store_with_a_leftover_journal_says_what_it_needs(tmp_path):
    from store.journal import HEADER, MAGIC

    location = str(tmp_path / "s.h5")
    write_video(FeatureStore.create(location, make_meta()), "kept", 0, 12)
    with open(location + ".writers/publish.journal", "wb") as journal:
        journal.write(HEADER.pack(MAGIC, os.path.getsize(location)))  # nothing to undo
    _chmod_tree(location + ".writers", writable=False)
    os.chmod(location, 0o444)
    try:
        if not _permissions_enforced(location + ".writers"):
            pytest.skip("permissions are not enforced for this user (root)")
        with pytest.raises(InputError, match="needs one access with write permission"):
            FeatureStore.open(location).videos()
    finally:
        _chmod_tree(location + ".writers", writable=True)
        os.chmod(location, 0o644)
    with pytest.warns(UserWarning, match="rolled back"):
        assert FeatureStore.open(location).videos() == ["kept"]


# -- concurrency ------------------------------------------------------------------------------

def test_three_writers_and_a_reader_on_one_new_store(location):
    """Three writers create one store at once and share the videos through claims; meanwhile a
    reader keeps listing and reading, and must only ever see complete, correct videos."""
    writers = [start_writer(location, pause=0.005) for _ in range(3)]
    expected = {vid: video_features(seed, num_clips) for vid, seed, num_clips in PLAN}
    while not (os.path.isfile(location) or os.path.isfile(os.path.join(location, "zarr.json"))):
        time.sleep(0.01)  # the store appears whole (built aside, then renamed or linked)
    reader = FeatureStore.open(location)  # one reader for the whole run, as training would
    seen = set()
    while True:
        finished = all(writer.poll() is not None for writer in writers)
        for video_id in reader.videos():
            assert_video_equals(reader, video_id, expected[video_id])
            seen.add(video_id)
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
    assert uncommitted(location) == []


def test_a_live_writers_staging_is_not_cleaned_by_another(tmp_path):
    location = str(tmp_path / "s.zarr")
    first = FeatureStore.create(location, make_meta())
    with first.video_writer("v", 5, video_info(5)) as writer:
        writer.write(0, {key: values for key, values in video_features(0, 5).items()})
        FeatureStore.create(location, make_meta())  # cleans only dead writers' temporaries
        assert len(uncommitted(location)) == 1
        assert writer.commit(clip_times(5))
    np.testing.assert_array_equal(FeatureStore.open(location).read("v", [LAST])[LAST],
                                  as_stored(video_features(0, 5)[LAST]))
