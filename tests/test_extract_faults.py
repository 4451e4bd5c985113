"""Extraction under faults: SIGKILL and resume, a full disk, concurrent extractors, torchrun
ranks, and hostile video files. Every store is compared bit for bit with an uninterrupted
single-process run of the same extraction (``reference`` below).

Cases per category, for the reliability totals (this file):
  crashes 7        SIGKILL while decoding, mid-write and between videos (Zarr), mid-write and
                   before the commit (HDF5), the main process with decoding workers, a worker
  disk/permissions 1   ENOSPC in the middle of a video, then the rerun
  concurrency 3    three extractors at once; two workers fed many short videos and a long one;
                   an extractor resuming while another holds a claim
  hostile inputs 11    empty, truncated MP4, truncated MKV, random bytes, zero frames, one frame,
                   4000x3000, variable frame rate, wrong extension (each on its own), all of
                   them at once through the command line with decoding workers, and a file
                   that decodes shorter than annotated (reported)
  determinism 1    torchrun with 2 processes equals 1 process
"""
import contextlib
import errno
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from extract.clips import KILL_AT_ENV
from extract.pipeline import run_extraction
from helpers import REPO
from helpers.extraction import (assert_same_contents, cli_args, settings_for,
                                start_extract, store_contents, write_videos)
from helpers.videos import write_empty, write_random_bytes, write_truncated, write_video
from losa_tal import InputError
from store import FeatureStore
from store.protocol import SamplingProtocol

# Four videos of 24, 14, 10 and 4 clips: batches of 3 write each video in several pieces.
FAULT_VIDEOS = {"v0.mkv": (108, 30), "v1.mp4": (68, 25), "v2.avi": (52, 30), "v3.mkv": (28, 30)}


def extract(videos, path, **hooks):
    """The faults' extraction in this process: batches of 3 clips, no workers."""
    return run_extraction(settings_for(videos, path, batch_size=3), show_progress=False, **hooks)


@pytest.fixture(scope="module")
def fault_videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fault_videos")
    return folder, write_videos(folder, FAULT_VIDEOS)


@pytest.fixture(scope="module")
def reference(fault_videos, tmp_path_factory):
    """What every run below must end with: one uninterrupted in-process run."""
    path = tmp_path_factory.mktemp("reference") / "reference.zarr"
    extract(fault_videos[1], path)
    return store_contents(path)


def start_cli(folder, store, backbone, *extra, kill_at=None, env=None):
    environment = {**os.environ, **(env or {})}
    environment.pop(KILL_AT_ENV, None)
    if kill_at:
        environment[KILL_AT_ENV] = kill_at
    return start_extract(folder, store, backbone, *extra, env=environment)


def finish(process, timeout=300):
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, stdout, stderr


def verify(store):
    """``python cli.py store verify`` (in process): every complete video right; the planned
    videos not committed reported as failed (files that cannot be decoded, with the reason the
    run recorded) or missing (a run stopped before them), exit status 1 only for missing."""
    result = CliRunner().invoke(main, ["store", "verify", str(store)])
    fs = FeatureStore.open(store)
    planned = {entry["video_id"] for entry in fs.planned_videos() or []}
    absent = planned - set(fs.videos())
    failed = set(re.findall(r"failed: (\S+): its source could not be extracted", result.output))
    missing = set(re.findall(r"missing: (\S+): planned, not committed", result.output))
    assert failed == absent & set(fs.failed_videos()) and missing == absent - failed, \
        result.output
    assert result.exit_code == (1 if missing else 0) and "bad:" not in result.output, \
        result.output
    return result


def assert_complete_videos_are_right(store, reference):
    """Whatever a reader can see is exactly the reference's."""
    contents = store_contents(store)
    assert set(contents) <= set(reference)
    assert_same_contents(contents, {vid: reference[vid] for vid in contents})
    return sorted(contents)


# -- crashes ----------------------------------------------------------------------------------
def kill_campaign(folder, store, backbone, reference, plan, *extra):
    """SIGKILL the command at each point of ``plan`` in turn, then let it finish."""
    seen = []
    for kill_at in plan:
        code, stdout, stderr = finish(start_cli(folder, store, backbone, *extra, kill_at=kill_at))
        assert code == -signal.SIGKILL, (kill_at, code, stdout, stderr)
        if Path(store).exists():
            verify(store)
            seen.append(assert_complete_videos_are_right(store, reference))
    code, stdout, stderr = finish(start_cli(folder, store, backbone, *extra))
    assert code == 0, stderr
    verify(store)
    assert_same_contents(store_contents(store), reference)
    return seen


def random_plan(seed, points, top=2):
    """A kill point and a random occurrence (1..top) for each of ``points``; with top 2 the
    four videos are never all published before the last kill."""
    rng = np.random.default_rng(seed)
    return [f"{point}:{rng.integers(1, top + 1)}" for point in points]


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run(
        fault_videos, reference, backbone_file, tmp_path):
    folder, _ = fault_videos
    plan = random_plan(1, ["decode", "write", "published"])
    seen = kill_campaign(folder, tmp_path / "s.zarr", backbone_file, reference, plan)
    assert seen[-1] and len(seen[-1]) < len(reference)  # the kills landed mid-run


@pytest.mark.slow
def test_sigkill_then_resume_on_hdf5(fault_videos, reference, backbone_file, tmp_path):
    folder, _ = fault_videos
    kill_campaign(folder, tmp_path / "s.h5", backbone_file, reference,
                  random_plan(2, ["write", "commit"]))


@pytest.mark.slow
def test_killed_with_decoding_workers_then_resumed(fault_videos, reference, backbone_file,
                                                   tmp_path):
    folder, _ = fault_videos
    store = tmp_path / "s.zarr"
    # The main process dies mid-write: its workers notice and exit (the pipes close).
    code, _, stderr = finish(start_cli(folder, store, backbone_file, "--num-workers", 2,
                                       kill_at="write:5"))
    assert code == -signal.SIGKILL, stderr
    verify(store)
    # A worker dies (as if the decoder crashed): one clear line, nothing partial kept.
    code, _, stderr = finish(start_cli(folder, store, backbone_file, "--num-workers", 2,
                                       kill_at="decode:2"))
    assert code == 2 and "Traceback" not in stderr, stderr
    message = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(message) == 1 and "a decoding worker died" in message[0], stderr
    verify(store)
    assert_complete_videos_are_right(store, reference)
    code, _, stderr = finish(start_cli(folder, store, backbone_file))
    assert code == 0, stderr
    assert_same_contents(store_contents(store), reference)


# -- disk full --------------------------------------------------------------------------------
def test_disk_full_mid_video_is_one_error_and_the_rerun_completes(
        fault_videos, reference, tmp_path, monkeypatch):
    import zarr.storage

    _, videos = fault_videos
    original_set = zarr.storage.LocalStore.set
    writes = []
    full_after = [None]  # writes that fit on the "disk"; None: all

    async def counting_set(self, key, value):
        writes.append(key)
        if full_after[0] is not None and len(writes) > full_after[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return await original_set(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", counting_set)
    extract(videos, tmp_path / "dry.zarr")
    full_after[0], writes[:] = len(writes) // 2, []  # the disk fills up halfway through
    path = tmp_path / "s.zarr"
    with pytest.raises(InputError, match="no space left on the device"):
        extract(videos, path)
    monkeypatch.undo()
    verify(path)
    assert 0 < len(assert_complete_videos_are_right(path, reference)) < len(reference)
    summary = extract(videos, path)
    assert summary.already and summary.done and not summary.failed
    assert_same_contents(store_contents(path), reference)


# -- concurrency ------------------------------------------------------------------------------
@pytest.mark.slow
def test_three_extractors_at_once_do_every_video_once(fault_videos, reference, backbone_file,
                                                      tmp_path):
    folder, _ = fault_videos
    store = tmp_path / "s.zarr"
    processes = [start_cli(folder, store, backbone_file) for _ in range(3)]
    done = 0
    for process in processes:
        code, stdout, stderr = finish(process)
        assert code == 0, stderr
        done += int(re.search(r"extracted (\d+) videos", stdout).group(1))
    assert done == len(reference)  # none encoded twice
    verify(store)
    assert_same_contents(store_contents(store), reference)


@contextlib.contextmanager
def deadline(seconds):
    """Fail (instead of hanging the suite) if the block takes longer than ``seconds``."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.slow
def test_two_workers_fed_many_short_videos_and_a_long_one_never_stall(tmp_path):
    """The DataLoader returns items in worker order; a worker waiting for a video once stalled
    the main process that waited for that worker (a deadlock, now an ``idle`` item)."""
    specs = {"long.mkv": (160, 30), **{f"s{i}.mkv": (16, 30) for i in range(8)}}
    videos = write_videos(tmp_path / "videos", specs)
    with deadline(120):
        summary = run_extraction(settings_for(videos, tmp_path / "s.zarr", num_workers=2,
                                              batch_size=32), show_progress=False)
    assert sorted(summary.done) == sorted(vid for vid, _ in videos)
    expected = run_extraction(settings_for(videos, tmp_path / "one.zarr", batch_size=32),
                              show_progress=False)
    assert expected.clips == summary.clips
    assert_same_contents(store_contents(tmp_path / "s.zarr"), store_contents(tmp_path / "one.zarr"))


def test_a_video_claimed_by_another_extractor_is_left_to_it(fault_videos, reference, tmp_path):
    _, videos = fault_videos
    path = tmp_path / "s.zarr"
    seen = {}

    def hold_v1(store):  # another process would hold this flock; a second descriptor is alike
        seen["claim"] = contextlib.ExitStack()
        other = FeatureStore.create(path, store.meta)
        assert seen["claim"].enter_context(other.claim("v1"))

    summary = extract(videos, path, store_ready=hold_v1)
    assert summary.taken == ["v1"] and sorted(summary.done) == ["v0", "v2", "v3"]
    seen["claim"].close()
    summary = extract(videos, path)
    assert summary.done == ["v1"]
    assert_same_contents(store_contents(path), reference)


# -- determinism ------------------------------------------------------------------------------
@pytest.mark.slow
def test_torchrun_with_two_processes_equals_one_process(fault_videos, reference, backbone_file,
                                                        tmp_path):
    folder, _ = fault_videos
    store = tmp_path / "s.zarr"
    args = cli_args(folder, store, backbone_file, "--batch-size", 3)
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "cli.py",
                             *args], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    counts = [int(n) for n in re.findall(r"extracted (\d+) videos", result.stdout)]
    assert len(counts) == 2 and sum(counts) == len(reference) and min(counts) > 0
    verify(store)
    assert_same_contents(store_contents(store), reference)


# -- hostile inputs ---------------------------------------------------------------------------
def hostile(kind, folder) -> str:
    """Write one hostile file into ``folder``; returns its file name."""
    folder = Path(folder)
    if kind == "empty":
        write_empty(folder / "empty.mp4")
        return "empty.mp4"
    if kind == "random_bytes":
        write_random_bytes(folder / "noise.mp4", size=20000)
        return "noise.mp4"
    if kind in ("truncated_mp4", "truncated_mkv"):
        ext = ".mp4" if kind == "truncated_mp4" else ".mkv"
        source = folder.parent / f"full{ext}"
        write_video(source, 90, seed=3)
        write_truncated(folder / f"cut_{ext[1:]}{ext}", source, keep=0.5)
        return f"cut_{ext[1:]}{ext}"
    if kind == "zero_frames":
        write_video(folder / "zero.mp4", 0)
        return "zero.mp4"
    if kind == "one_frame":
        write_video(folder / "one.mp4", 1)
        return "one.mp4"
    if kind == "huge":
        write_video(folder / "huge.mp4", 3, height=3000, width=4000)
        return "huge.mp4"
    if kind == "variable_rate":
        times = np.cumsum([0] + [0.01, 0.09, 0.03] * 10)[:30]
        write_video(folder / "vfr.mkv", 30, frame_times=times)
        return "vfr.mkv"
    if kind == "wrong_extension":
        write_video(folder / "named.avi", 30, codec_ext=".mkv")
        return "named.avi"
    raise ValueError(kind)


# kind -> None (extracted, as documented in docs/extraction.md) or the reason it is skipped.
HOSTILE = {"empty": "empty file", "random_bytes": "cannot open", "truncated_mp4": "cannot open",
           "zero_frames": "cannot open", "truncated_mkv": None, "one_frame": None, "huge": None,
           "variable_rate": None, "wrong_extension": None}
HOSTILE_SIZE = 80  # above PyTorch's small-output path: 4000x3000 frames need no padding


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_a_hostile_video_is_skipped_with_one_line_or_extracted(kind, tmp_path):
    folder = tmp_path / "videos"
    videos = write_videos(folder, {"good.mkv": (20, 30)})
    name = hostile(kind, folder)
    videos.append((Path(name).stem, str(folder / name)))
    settings = settings_for(videos, tmp_path / "s.zarr",
                            protocol=SamplingProtocol(img_size=HOSTILE_SIZE))
    with deadline(60):
        summary = run_extraction(settings, show_progress=False)
    fs = FeatureStore.open(tmp_path / "s.zarr")
    assert "good" in summary.done and "good" in fs
    stem = Path(name).stem
    if HOSTILE[kind] is None:
        assert stem in summary.done and not summary.failed
        times = fs.feature_times(stem)
        assert len(times) == fs.video_info(stem)["num_clips"] >= 1
    else:
        reason = summary.failed[stem]
        assert reason.startswith(f"{name}: {HOSTILE[kind]}") and "\n" not in reason, reason
        assert len(reason) < 300 and stem not in fs


def test_a_video_decoding_shorter_than_annotated_is_reported(tmp_path):
    folder = tmp_path / "videos"
    videos = write_videos(folder, {"good.mkv": (20, 30)})
    name = hostile("truncated_mkv", folder)  # 90 frames, 3 s, cut in half
    videos.append((Path(name).stem, str(folder / name)))
    settings = settings_for(videos, tmp_path / "s.zarr",
                            expected_durations={"good": 20 / 30, "cut_mkv": 3.0})
    summary = run_extraction(settings, show_progress=False)
    assert sorted(summary.done) == ["cut_mkv", "good"] and list(summary.warnings) == ["cut_mkv"]
    assert summary.warnings["cut_mkv"].endswith("the annotations say 3.00 s (a truncated "
                                                "file?); extracted as decoded")


@pytest.mark.slow
def test_all_hostile_videos_at_once_through_the_command_line(backbone_file, tmp_path):
    folder = tmp_path / "videos"
    write_videos(folder, {"good.mkv": (20, 30)})
    names = {kind: hostile(kind, folder) for kind in HOSTILE}
    store = tmp_path / "s.zarr"
    process = start_cli(folder, store, backbone_file, "--num-workers", 2,
                        "--img-size", HOSTILE_SIZE)
    code, stdout, stderr = finish(process, timeout=240)
    assert code == 1 and "Traceback" not in stderr, stderr
    failed = [kind for kind, reason in HOSTILE.items() if reason]
    assert f"{len(failed)} failed" in stdout
    for kind in failed:
        assert f"  failed: {names[kind]}: {HOSTILE[kind]}" in stdout, stdout
    extracted = {Path(names[k]).stem for k, reason in HOSTILE.items() if reason is None}
    assert set(FeatureStore.open(store).videos()) == extracted | {"good"}
    # Each failure is recorded with its reason: verify tells them from videos not yet reached.
    recorded = FeatureStore.open(store).failed_videos()
    assert set(recorded) == {Path(names[kind]).stem for kind in failed}
    for kind in failed:
        assert HOSTILE[kind] in recorded[Path(names[kind]).stem]
    verify(store)
