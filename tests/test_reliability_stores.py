"""Reliability campaign, stores that lie (see docs/reliability.md).

A real store's metadata is edited by hand, as a careless copy or a malicious share might, to
lie about its shapes, dtype, layers, clip counts, frame rate or feature times. Then the commands
a lab runs on shared stores, ``train``, ``infer``, ``store verify`` and ``store export``, are
run on it through the real command line. Each must refuse with one ``error:`` line naming the
store, or (for a lie about data it does not read) give exactly what the honest store gives:
never a traceback, never a result computed from misread features. An HDF5 store whose own
metadata (the library's index and name heaps) is damaged is one line saying so, never a
traceback and never an empty store.
"""
import collections
import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from helpers import slow_except
from helpers.stores import edit_record, video_dir
from helpers.training import (synthetic_videos, tiny_config, write_annotations, write_config,
                              write_store)

EDITED = "video_000"  # a training video: every command below reads it


def edit_root(store: Path, **changes):
    document = json.loads((store / "zarr.json").read_text())
    meta = document["attributes"]["losa_tal"]
    for key, value in changes.items():
        if value is DELETE:
            del meta[key]
        else:
            meta[key] = value
    (store / "zarr.json").write_text(json.dumps(document))


def edit_video(store: Path, **changes):
    edit_record(store, EDITED, **changes)


def edit_times(store: Path, values):
    import zarr

    zarr.open_array(str(video_dir(store, EDITED) / "times"), mode="r+")[:len(values)] = values


DELETE = object()
# The honest store: float32, feature_dim 16, layers [1, 2], tokens [1, 1, 2], 96 clips per video.
LIES = {
    "feature_dim larger": lambda s: edit_root(s, feature_dim=32),
    "feature_dim smaller": lambda s: edit_root(s, feature_dim=8),
    "feature_dim a string": lambda s: edit_root(s, feature_dim="16"),
    "more tokens": lambda s: edit_root(s, tokens=[1, 2, 2]),
    "fewer tokens": lambda s: edit_root(s, tokens=[1, 1, 1]),
    "tokens of two numbers": lambda s: edit_root(s, tokens=[1, 2]),
    "dtype float16": lambda s: edit_root(s, dtype="float16"),
    "dtype int8": lambda s: edit_root(s, dtype="int8"),
    "a layer that is not there": lambda s: edit_root(s, layers=[1, 2, 3]),
    "a layer renamed": lambda s: edit_root(s, layers=[1, 7]),
    "a layer twice": lambda s: edit_root(s, layers=[1, 1]),
    "layers not a list": lambda s: edit_root(s, layers="1,2"),
    "no layers key": lambda s: edit_root(s, layers=DELETE),
    "format version 3": lambda s: edit_root(s, format_version=3),
    "backbone null": lambda s: edit_root(s, backbone=None),
    "num_clips one more": lambda s: edit_video(s, num_clips=97),
    "num_clips one fewer": lambda s: edit_video(s, num_clips=95),
    "num_clips zero": lambda s: edit_video(s, num_clips=0),
    "num_clips a string": lambda s: edit_video(s, num_clips="96"),
    "fps negative": lambda s: edit_video(s, fps=-30.0),
    "fps NaN": lambda s: edit_video(s, fps=float("nan")),
    "duration negative": lambda s: edit_video(s, duration=-1.0),
    "float32 layer that is not there": lambda s: edit_video(s, float32_layers=["layer_9"]),
    "times going back": lambda s: edit_times(s, [5.0, 4.0]),
    "times NaN": lambda s: edit_times(s, [float("nan")]),
}


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    """An honest store, a run trained on it, and what infer and export give on it."""
    root = tmp_path_factory.mktemp("honest")
    videos = {**synthetic_videos(2, "training"), **synthetic_videos(1, "validation", first=2)}
    store = write_store(root / "store.zarr", videos)
    annotations = write_annotations(root / "gt.json", videos)
    config = write_config(root / "config.json", tiny_config(train={"epochs": 1}))
    paths = {"root": root, "store": store, "annotations": annotations, "config": config}
    assert invoke(command("train", paths, store, root / "run")).exit_code == 0
    assert invoke(command("infer", paths, store, root / "preds.json")).exit_code == 0
    assert invoke(command("export", paths, store, root / "export")).exit_code == 0
    return paths


def command(name, paths, store, out) -> list:
    return {
        "train": ["train", "--config", paths["config"], "--store", store, "--annotations",
                  paths["annotations"], "--out", out, "--quiet"],
        "infer": ["infer", "--run", paths["root"] / "run", "--store", store, "--annotations",
                  paths["annotations"], "--subset", "training", "--out", out, "--quiet"],
        "export": ["store", "export", store, "--out", out],
        "verify": ["store", "verify", store],
    }[name]


def invoke(args):
    return CliRunner().invoke(cli.main, [str(arg) for arg in args])


def same_output(name, honest_out: Path, out: Path) -> bool:
    if name == "infer":
        return json.loads(out.read_text()) == json.loads(honest_out.read_text())
    files = sorted(path.name for path in honest_out.iterdir())
    return sorted(path.name for path in out.iterdir()) == files and all(
        np.array_equal(np.load(honest_out / f), np.load(out / f)) for f in files)


@pytest.mark.parametrize("lie", slow_except(LIES, ["feature_dim larger", "num_clips one more"]))
def test_a_store_that_lies_is_refused_by_every_command(honest, tmp_path, lie):
    store = tmp_path / "store.zarr"
    shutil.copytree(honest["store"], store)
    LIES[lie](store)
    refusal = f"error: {store}: "
    for name, out in (("train", tmp_path / "run"), ("infer", tmp_path / "preds.json"),
                      ("export", tmp_path / "export")):
        result = invoke(command(name, honest, store, out))
        assert "Traceback" not in result.output
        if result.exit_code == 0 and name != "train":  # train reads every layer of every video
            assert same_output(name, honest["root"] / out.name, out), f"{name}: misread store"
            continue
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert result.exit_code == 2 and len(errors) == 1 and errors[0].startswith(refusal), \
            f"{name}: exit {result.exit_code} {result.exception!r}\n{result.output[-1500:]}"
    verified = invoke(command("verify", honest, store, None))
    assert verified.exit_code in (1, 2) and "Traceback" not in verified.output
    assert (f"bad: {EDITED}: " in verified.stdout) if verified.exit_code == 1 else \
        verified.stderr.startswith(refusal)


def hide_videos_group(data: bytearray, path: Path):
    """Rename the root's link to /videos in its name heap (the first "videos" in the file)."""
    at = data.index(b"videos\x00")
    data[at:at + 6] = b"vidxos"


def damage_videos_name_heap(data: bytearray, path: Path):
    """Break the signature of the name heap of /videos, found through the group's header."""
    import h5py

    with h5py.File(path, "r") as handle:
        header = h5py.h5o.get_info(handle["videos"].id).addr
    heap = next(value for value in (int.from_bytes(data[at:at + 8], "little")
                                    for at in range(header, header + 256))
                if 0 < value < len(data) - 4 and data[value:value + 4] == b"HEAP")
    data[heap:heap + 4] = b"XEAP"


HDF5_DAMAGE = {"videos group hidden": hide_videos_group,
               "videos name heap": damage_videos_name_heap}


@pytest.mark.parametrize("damage", HDF5_DAMAGE)
def test_damaged_hdf5_metadata_is_one_line_naming_the_file(tmp_path, damage):
    videos = {**synthetic_videos(2, "training"), **synthetic_videos(1, "validation", first=2)}
    store = write_store(tmp_path / "store.h5", videos)
    annotations = write_annotations(tmp_path / "gt.json", videos)
    config = write_config(tmp_path / "config.json", tiny_config(train={"epochs": 1}))
    data = bytearray(store.read_bytes())
    HDF5_DAMAGE[damage](data, store)
    store.write_bytes(bytes(data))
    paths = {"root": tmp_path, "store": store, "annotations": annotations, "config": config}
    for name in ("info", "verify", "export", "train"):
        args = ["store", "info", store] if name == "info" else \
            command(name, paths, store, tmp_path / name)
        result = invoke(args)
        errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
        assert result.exit_code == 2 and "Traceback" not in result.output, (name, result.output)
        assert len(errors) == 1 and errors[0].startswith(f"error: {store}: damaged HDF5 "
                                                         "metadata"), (name, result.output)


# -- global heaps: stores written before kept their JSON as variable-length strings ------------
def written_before(path: Path, videos) -> Path:
    """A store written through the project's writer as stores were written before: JSON text in
    variable-length strings, whose bytes live in the file's global heap collections."""
    from store import hdf5_backend

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hdf5_backend, "_json_text", json.dumps, raising=False)
        return write_store(path, videos)


def heap_collections(data: bytes) -> list[dict]:
    """Each global heap collection in the file, parsed from its bytes (HDF5 file format
    specification, "Global Heap"; 8-byte lengths, as h5py writes them):

    collection: "GCOL" (4 bytes), version 1 (1), reserved (3), collection size (8, header
    included), then objects, each starting on an 8-byte boundary:
    object: heap object index (2), reference count (2), reserved (4), object size (8), the
    object's bytes padded to a multiple of 8. Index 0 is the free space at the end; its size
    counts its own 16-byte header.
    Returns ``{"at", "size", "objects": [{"index", "at", "size"}]}`` (``at``: offsets in the
    file; an object's size field is at ``at + 8``).
    """
    found, at = [], data.find(b"GCOL")
    while at >= 0:
        size, objects, offset = int.from_bytes(data[at + 8:at + 16], "little"), [], at + 16
        while offset + 16 <= at + size:
            index = int.from_bytes(data[offset:offset + 2], "little")
            length = int.from_bytes(data[offset + 8:offset + 16], "little")
            objects.append({"index": index, "at": offset, "size": length})
            if index == 0:
                break
            offset += 16 + -(-length // 8) * 8
        found.append({"at": at, "size": size, "objects": objects})
        at = data.find(b"GCOL", at + 4)
    return found


def run_command(args, timeout=120, launcher=()):
    """The real command line in its own session, every process of it killed (SIGKILL) after
    ``timeout`` seconds: a process stuck inside the HDF5 library does not answer SIGTERM, and
    one left running would slow every later command. A command that left a process running
    fails the test. ``launcher``: a command line that runs the rest (see ``REAL_TIME``)."""
    from helpers import REPO
    from helpers.processes import session_processes

    process = subprocess.Popen([*launcher, sys.executable, str(REPO / "cli.py")] +
                               [str(a) for a in args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        left = session_processes(process.pid) if os.path.isdir("/proc") else {}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
    assert not left, (args, left)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def store_written_before(tmp_path_factory):
    root = tmp_path_factory.mktemp("written_before")
    videos = {**synthetic_videos(2, "training"), **synthetic_videos(1, "validation", first=2)}
    assert heap_collections(write_store(root / "new.h5", videos).read_bytes()) == [], \
        "new stores hold no variable-length data"
    store = written_before(root / "store.h5", videos)
    annotations = write_annotations(root / "gt.json", videos)
    config = write_config(root / "config.json", tiny_config(train={"epochs": 1}))
    honest = run_command(["store", "verify", store])
    assert honest.returncode == 0, honest.stderr
    return {"root": root, "store": store, "annotations": annotations, "config": config,
            "verify": honest.stdout}


def damaged_copy(paths, tmp_path, at: int, flip: int) -> Path:
    data = bytearray(paths["store"].read_bytes())
    data[at] ^= flip
    store = tmp_path / f"store_{at}.h5"
    store.write_bytes(bytes(data))
    return store


def verify_damaged(paths, tmp_path, at: int) -> tuple:
    """``(at, store, result)`` of ``store verify`` on a copy with byte ``at`` flipped; the copy
    is deleted after."""
    store = damaged_copy(paths, tmp_path, at, 0xFF)
    try:
        return at, store, run_command(["store", "verify", store])
    finally:
        store.unlink()


def root_metadata_object(data: bytes) -> dict:
    """The heap object holding the root metadata (the one whose bytes start its JSON)."""
    return next(obj for heap in heap_collections(data) for obj in heap["objects"]
                if obj["index"] and data[obj["at"] + 16:].startswith(b'{"dtype"'))


def looping_copy(paths, tmp_path) -> Path:
    """A copy with the flip that made the HDF5 library loop forever inside H5Aread: the top bit
    of the low byte of the root metadata object's size. The parse of the collection then lands
    in its free space on an object of index 0 and size 0, and never moves on."""
    obj = root_metadata_object(paths["store"].read_bytes())
    return damaged_copy(paths, tmp_path, obj["at"] + 8, 0x80)


def assert_one_damaged_line(result, store):
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(errors) == 1 and errors[0].startswith(f"error: {store}: damaged HDF5 metadata"), \
        result.stderr


@pytest.mark.parametrize("name", slow_except(["verify", "info", "train", "export"], ["verify"]))
def test_a_damaged_global_heap_length_is_one_line_not_a_hang(store_written_before, tmp_path,
                                                             name):
    paths = store_written_before
    store = looping_copy(paths, tmp_path)
    args = ["store", "info", store] if name == "info" else \
        command(name, paths, store, tmp_path / name)
    assert_one_damaged_line(run_command(args), store)


def test_a_store_written_before_reads_and_appends_as_before(store_written_before, tmp_path):
    """Variable-length attributes are still read, a plan part kept as an attribute too, and a
    writer appends to such a store (its new video and plan part in the new encoding)."""
    import h5py

    from store import FeatureStore

    path = tmp_path / "store.h5"
    shutil.copy(store_written_before["store"], path)
    with h5py.File(path, "a", locking=False) as handle:  # a plan part as it was written before
        handle.require_group("plan").attrs["000001"] = json.dumps([{"video_id": "video_000"}])
    reader = FeatureStore.open(path)
    assert reader.videos() == ["video_000", "video_001", "video_002"]
    assert reader.meta["feature_dim"] == 16 and reader.video_info("video_001")["fps"] == 30.0
    assert reader.planned_videos() == [{"video_id": "video_000"}]
    writer = FeatureStore.create(path, reader.meta)
    video = synthetic_videos(1, "training", first=3)["video_003"]
    features = {1: video["last"][:, None, :].repeat(2, 1), 2: video["last"][:, None, :]
                .repeat(2, 1), "last": video["last"]}
    assert writer.write_video("video_003", features, video["times"], {"fps": 25.0})
    writer.record_plan([{"video_id": "video_003"}])
    again = FeatureStore.open(path)
    assert again.videos() == ["video_000", "video_001", "video_002", "video_003"]
    assert again.video_info("video_003")["fps"] == 25.0
    assert again.planned_videos() == [{"video_id": "video_000"}, {"video_id": "video_003"}]
    verified = run_command(["store", "verify", path])
    assert verified.returncode == 0 and "4 video(s) checked, 0 bad" in verified.stdout, verified


# The bytes the sweep below flips in the 3-video store: 4 collections (the root metadata's, one
# per video record), 16 + 2 x 16 header bytes each, and every ninth byte of the 4 objects.
GLOBAL_HEAP_FLIPS = 275


@pytest.mark.slow
def test_no_flipped_byte_of_a_global_heap_hangs_a_command(store_written_before, tmp_path):
    """Every byte of every collection's headers (the collection's and each object's), and every
    ninth byte of the objects' contents, flipped in turn: `store verify` ends within the bound
    with one error line naming the file, bad videos named, or the honest store's own report."""
    paths = store_written_before
    data = paths["store"].read_bytes()
    places = set()
    for heap in heap_collections(data):
        places.update(range(heap["at"], heap["at"] + 16))
        for obj in heap["objects"]:
            places.update(range(obj["at"], obj["at"] + 16))
            if obj["index"]:
                places.update(range(obj["at"] + 16, obj["at"] + 16 + obj["size"], 9))
    assert len(places) == GLOBAL_HEAP_FLIPS, "the store's layout changed: count again"
    outcomes = collections.Counter()
    # Three at a time: a stalled run waits idle for the reader's stall limit.
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        for at, store, result in pool.map(lambda at: verify_damaged(paths, tmp_path, at),
                                          sorted(places)):
            assert "Traceback" not in result.stderr, (at, result.stderr)
            if result.returncode == 2:
                errors = [line for line in result.stderr.splitlines()
                          if line.startswith("error: ")]
                assert len(errors) == 1 and errors[0].startswith(f"error: {store}: "), \
                    (at, errors)
            elif result.returncode == 1:
                assert "bad: " in result.stdout, (at, result.stdout)
            else:
                assert result.returncode == 0 and result.stdout == paths["verify"], (at, result)
            outcomes[result.returncode] += 1
    assert outcomes[2] > 0, outcomes


test_no_flipped_byte_of_a_global_heap_hangs_a_command.reliability_cases = GLOBAL_HEAP_FLIPS


# -- the child that reads a store's attributes first: it must end, and end with its command ----
def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the reader dies with its "
                    "command through Linux's PR_SET_PDEATHSIG; elsewhere its CPU limit ends it")
def test_a_killed_command_leaves_no_reader_spinning(store_written_before, tmp_path):
    """SIGKILL (the OOM killer, a scheduler's hard kill, a test's timeout) reaches only the
    command; its reader, stuck in the library's loop where no signal handler runs, must not spin
    on. Left running, each took a core, and every later command ran slower."""
    from helpers import REPO
    from helpers.processes import session_processes

    store = looping_copy(store_written_before, tmp_path)
    process = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "store", "verify", store],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:  # until the reader has spun for a second (reading an honest file: 0.1 s)
            readers = set(session_processes(process.pid)) - {process.pid}
            if readers and cpu_seconds(min(readers)) >= 1.0:
                break
            assert process.poll() is None and time.monotonic() < deadline, "no reader spun"
            time.sleep(0.05)
        process.kill()
        process.wait()
        deadline = time.monotonic() + 10
        while session_processes(process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not session_processes(process.pid), session_processes(process.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


def test_a_reader_alone_ends_at_its_cpu_limit(store_written_before, tmp_path):
    """Where nothing ends the reader with its command, its CPU limit does: run with nobody
    watching it, on the file that loops forever, it is ended by the kernel."""
    from store import hdf5_backend

    store = looping_copy(store_written_before, tmp_path)
    result = subprocess.run(hdf5_backend._attribute_reader(str(store), 2), capture_output=True,
                            timeout=60)
    assert result.returncode in (-signal.SIGXCPU, -signal.SIGKILL), result
    assert result.stdout == b"\n", "it opened the file and stuck on the first attribute"


def test_a_reader_that_never_stalls_is_stopped_at_the_total_limit(store_written_before,
                                                                  monkeypatch):
    """A reader that keeps making progress forever never trips the stall limit: the total limit
    ends it, with the one damaged-metadata line."""
    from losa_tal import InputError
    from store import hdf5_backend

    monkeypatch.setattr(hdf5_backend, "_READ_ATTRIBUTES",
                        "import time\nwhile True:\n    print(flush=True)\n    time.sleep(0.05)\n")
    monkeypatch.setattr(hdf5_backend, "CHILD_TOTAL_SECONDS", 3.0)
    store, outcome = str(store_written_before["store"]), {}

    def check():
        try:
            hdf5_backend._check_attributes_in_child(store)
        except InputError as error:
            outcome["error"] = str(error)

    started = time.monotonic()
    thread = threading.Thread(target=check, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the check never ended"
    assert 3.0 <= time.monotonic() - started < 30
    assert outcome["error"].startswith(f"{store}: damaged HDF5 metadata (reading its attributes "
                                       "did not end within 3 s)"), outcome


def test_links_in_a_cycle_are_read_once(store_written_before, tmp_path):
    """Hard links may form cycles (a group linked into itself, twice over): the reader visits
    each object once and follows no soft or external link, so such a store verifies as the
    honest one. Walking every path, the reader never stalled and never ended."""
    import h5py

    store = tmp_path / "store.h5"
    shutil.copy(store_written_before["store"], store)
    with h5py.File(store, "a", locking=False) as handle:
        loops = handle.create_group("loops")
        loops.attrs["note"] = "a variable-length string"
        loops["again"], loops["and_again"] = loops, loops
        loops["soft"] = h5py.SoftLink("/loops")
        loops["elsewhere"] = h5py.ExternalLink(str(tmp_path / "missing.h5"), "/")
    result = run_command(["store", "verify", store], timeout=60)
    assert result.returncode == 0 and result.stdout == store_written_before["verify"], result


# Runs the command line after it on the first CPU under SCHED_FIFO, as a command started from
# a process that an encoder library raised to real time (SVT-AV1 as root; see
# synth.videos.scheduling_kept) runs; one CPU, so that one spinning child is enough to starve
# its parent wherever the test runs.
REAL_TIME = [sys.executable, "-c", "import os, sys; "
             "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
             "os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1)); "
             "os.execv(sys.argv[1], sys.argv[1:])"]


def real_time_allowed() -> bool:
    return hasattr(os, "sched_setscheduler") and subprocess.run(
        [*REAL_TIME, sys.executable, "-c", ""], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("scheduling", ["ordinary", "real-time"])
def test_looping_reads_at_once_each_end_in_one_line(store_written_before, tmp_path, scheduling):
    """Six commands at once, most of them with a reader stuck in the library's loop: each ends
    with its one damaged-metadata line, and none leaves a process (run_command checks). The
    flips: each collection's size, and each collection's first object's size. Under real-time
    scheduling a spinning reader kept its command, and so its watchdog, off the CPU: in CI two
    readers on two cores hung three commands until the test's timeout (and, before the reader
    had a CPU limit, for ever)."""
    if scheduling == "real-time" and not real_time_allowed():
        pytest.skip("this user may not use real-time scheduling (needs CAP_SYS_NICE)")
    launcher = REAL_TIME if scheduling == "real-time" else ()
    data, paths = store_written_before["store"].read_bytes(), store_written_before
    heaps = heap_collections(data)
    flips = [(heaps[0]["at"] + 8, 0xFF), (heaps[0]["at"] + 9, 0xFF)] + \
        [(heap["objects"][0]["at"] + 8, 0xFF) for heap in heaps]
    stores = [damaged_copy(paths, tmp_path, at, flip) for at, flip in flips]
    with concurrent.futures.ThreadPoolExecutor(len(stores)) as pool:
        results = list(pool.map(lambda store: run_command(["store", "verify", store],
                                                          launcher=launcher), stores))
    for store, result in zip(stores, results):
        assert_one_damaged_line(result, store)
    stalls = sum("stop responding" in result.stderr for result in results)
    assert stalls >= 4, [result.stderr for result in results]
