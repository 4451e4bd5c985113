"""Long videos extracted in parts (store/parts.py, extract/shards.py): a part's clips decode as
the same clips of the whole video; parts are committed once each, by real processes racing on
one part or on the assembly, on disk and on an S3-compatible server (moto on 127.0.0.1); shards
of ``extract`` split a long video, die between a part's write and its commit or before the
assembly, and a resume with another number of shards finishes a store bit-identical to one
process's; readers, ``store verify`` and ``store gc`` see parts as the docs say.
"""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli import main
from extract.clips import KILL_AT_ENV, gather_clips, iter_chunks
from extract.pipeline import run_extraction
from extract.shards import PART_SECONDS_ENV, Shard, Shares, plan_entry, work_order
from helpers import TESTS_DIR
from helpers.extraction import (WITHOUT_LOCKS, assert_same_contents, extracted, finish_all,
                                settings_for, start_shard, store_contents, write_videos)
from helpers.s3 import BUCKET, moto_server
from helpers.stores import (assert_video_equals, clip_times, make_meta, video_features,
                            video_info)
from helpers.videos import write_video
from store import FeatureStore
from store.protocol import SamplingProtocol, part_range
from store.verify import verify_store

# -- the plan and the order of work ------------------------------------------------------------
def test_parts_cover_every_clip_once():
    for num_clips in (1, 2, 7, 29, 1000):
        for parts in (1, 2, 3, 5, 14):
            ranges = [part_range(part, parts, num_clips) for part in range(parts)]
            assert ranges[0][0] == 0 and ranges[-1][1] == num_clips
            assert all(stop == first for (_, stop), (first, _) in zip(ranges, ranges[1:]))
            assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


def test_the_plan_records_parts_and_every_shard_orders_each_part_once(tmp_path, monkeypatch):
    video = tmp_path / "v.mp4"
    video.write_bytes(b"x")
    assert plan_entry("v", video, 1000.0)["parts"] == 9  # 120 s parts by default
    assert plan_entry("v", video, None)["parts"] == 1
    monkeypatch.setenv(PART_SECONDS_ENV, "10")
    assert plan_entry("v", video, 25.0)["parts"] == 3
    # "old" was planned before parts existed: one part
    plan = [{"video_id": "long", "duration": 30.0, "parts": 3},
            {"video_id": "mid", "duration": 12.0, "parts": 1},
            {"video_id": "old", "duration": 40.0}]
    items = sorted(["mid", "old", ("long", 0), ("long", 1), ("long", 2)], key=str)
    for count in (2, 3):
        orders = [work_order(plan, Shard(index, count, "t")) for index in range(count)]
        assert all(sorted(order, key=str) == items for order in orders)
    split = Shares(plan, 2)
    assert split.owned == [["old"], ["mid", ("long", 0), ("long", 1), ("long", 2)]]
    assert work_order(plan, Shard(0, 2, "t")) == ["old", ("long", 2), ("long", 1), ("long", 0),
                                                  "mid"]
    assert sorted(work_order(plan, Shard(0, 1, "t"), split=False)) == ["long", "mid", "old"]
    # a committed part is finished; a committed video finishes all its parts
    assert split.at_work({"mid"}, but=0) == {("long", 0)}
    assert split.at_work({"mid", ("long", 0)}, but=0, depth=2) == {("long", 1), ("long", 2)}
    assert split.at_work({"mid", "long"}, but=0) == set()


# -- decoding a part ---------------------------------------------------------------------------
@pytest.mark.parametrize("name, protocol, decoder", [
    ("v.mp4", SamplingProtocol(img_size=32), "decord"),
    ("v.avi", SamplingProtocol(img_size=32, fps=15, clip_stride=2), "pyav"),
])
def test_a_part_decodes_as_the_same_clips_of_the_whole_video(tmp_path, name, protocol, decoder):
    path = tmp_path / name
    write_video(path, 150, fps=30, seed=3)

    def clips(part, per_chunk):
        chunks = list(iter_chunks("v", path, protocol, per_chunk, part=part))
        assert chunks[0]["info"]["decoder"]["name"] == decoder
        assert chunks[0]["times"] is not None and all(c["times"] is None for c in chunks[1:])
        return chunks, torch.cat([gather_clips(c["frames"], c["index"]) for c in chunks])

    whole_chunks, whole = clips(None, 4)
    num_clips = whole_chunks[0]["num_clips"]
    assert len(whole) == num_clips >= 9
    for part, parts in ((0, 3), (1, 3), (2, 3), (3, 4)):
        first, stop = part_range(part, parts, num_clips)
        chunks, got = clips((part, parts), 5)
        assert [c["clips"] for c in chunks] == [(first, stop)] * len(chunks)
        assert chunks[0]["first_clip"] == first
        assert torch.equal(got, whole[first:stop])  # bit for bit
        np.testing.assert_array_equal(chunks[0]["times"], whole_chunks[0]["times"])


# -- parts in the store, written by racing processes -------------------------------------------
VIDEO, PARTS, CLIPS = "long", 3, 41

# A writer process: writes part k (slowly), or assembles the video, once the go file exists.
NODE = """
import json, os, sys, time
sys.path.insert(0, {tests!r})
from helpers.stores import clip_times, make_meta, video_features, video_info
from store import FeatureStore
import store.parts
mode, location, options, go = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
video, parts, clips = {video!r}, {parts}, {clips}
fs = FeatureStore.create(location, make_meta(), storage_options=options or None)
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.005)
if mode == "assemble":  # copying slower than starting: both assemblers copy at once
    copy = store.parts._copy_part
    store.parts._copy_part = lambda *args: (time.sleep(0.3), copy(*args))
    print("assembled", fs.assemble(video), flush=True)
else:
    part = int(mode)
    first, stop = store.protocol.part_range(part, parts, clips)
    features = video_features(1, clips)
    with fs.part_writer(video, part, parts, clips, video_info(clips)) as writer:
        for start in range(first, stop, 4):
            end = min(stop, start + 4)
            writer.write(start, {{key: values[start:end] for key, values in features.items()}})
            time.sleep(0.02)
        print("part", part, writer.commit(clip_times(clips)), flush=True)
"""


def start_node(mode, location, go, options=None):
    script = NODE.format(tests=str(TESTS_DIR), video=VIDEO, parts=PARTS, clips=CLIPS)
    node = subprocess.Popen([sys.executable, "-W", "ignore", "-c", script, str(mode),
                             str(location), json.dumps(options or {}), str(go)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return node


def race(mode, location, go, options=None, count=2) -> list[str]:
    """``count`` nodes doing the same thing at once; their last output lines, sorted."""
    nodes = [start_node(mode, location, go, options) for _ in range(count)]
    for node in nodes:
        assert node.stdout.readline() == "ready\n", node.stderr.read()
    Path(go).touch()
    lines = []
    for node in nodes:
        out, err = node.communicate(timeout=240)
        assert node.returncode == 0, err
        lines.append(out.strip().splitlines()[-1])
    Path(go).unlink()
    return sorted(lines)


def write_part(fs, part):
    first, stop = part_range(part, PARTS, CLIPS)
    features = video_features(1, CLIPS)
    with fs.part_writer(VIDEO, part, PARTS, CLIPS, video_info(CLIPS)) as writer:
        writer.write(first, {key: values[first:stop] for key, values in features.items()})
        assert writer.commit(clip_times(CLIPS))


def attempts(fs) -> set:
    """Every attempt in the store, committed part, video or neither."""
    return {path for path, _ in fs.leftovers(0) if path.startswith("attempts/")} | \
        used_attempts(fs)


def used_attempts(fs) -> set:
    backend = fs._backend
    parts = {doc["path"] for doc in backend.part_documents(VIDEO).values()}
    commit = backend.commit_document(VIDEO)
    return parts | ({commit["path"]} if commit else set())


def reference(tmp_path, options=None, location=None):
    """The video as a one-process writer stores it, whole."""
    fs = FeatureStore.create(location or tmp_path / "one.zarr", make_meta(),
                             storage_options=options)
    assert fs.write_video(VIDEO, video_features(1, CLIPS), clip_times(CLIPS), video_info(CLIPS))
    return fs


def check_race_flow(location, go, options=None):
    """Parts 0 and 2 written here; two nodes race on part 1, then two on the assembly."""
    fs = FeatureStore.create(location, make_meta(), storage_options=options)
    fs.record_plan([{"video_id": VIDEO, "parts": PARTS}])
    write_part(fs, 0)
    write_part(fs, 2)
    assert fs.assemble(VIDEO) is None and fs.videos() == []
    assert race(1, location, go, options) == ["part 1 False", "part 1 True"]
    assert FeatureStore.open(location, options).videos() == []  # readers never see parts
    assert attempts(fs) == used_attempts(fs)  # the loser dropped its own attempt, nothing else
    assert race("assemble", location, go, options) == ["assembled False", "assembled True"]
    reader = FeatureStore.open(location, options)
    assert reader.videos() == [VIDEO]
    assert_video_equals(reader, VIDEO, video_features(1, CLIPS))
    one = reference(None, options, str(location) + "-one")
    assert reader.video_info(VIDEO) == one.video_info(VIDEO)
    assert attempts(fs) == used_attempts(fs)  # one assembly attempt kept
    report = verify_store(reader)
    assert report.clean and report.bad == {}
    return fs


def test_processes_racing_on_a_part_and_on_the_assembly_commit_each_once(tmp_path):
    location = tmp_path / "s.zarr"
    fs = check_race_flow(location, tmp_path / "go")
    # Now the parts and their attempts are leftovers, which gc removes; the video stays.
    commit = fs._backend.commit_document(VIDEO)["path"]
    runner = CliRunner()
    result = runner.invoke(main, ["store", "gc", str(location), "--older-than", "0s",
                                  "--delete"])
    assert result.exit_code == 0, result.output
    assert f"removed: parts/{VIDEO}" in result.output and result.output.count("removed:") == 4
    assert attempts(fs) == {commit} and fs.committed_parts([VIDEO]) == {}
    assert_video_equals(FeatureStore.open(location), VIDEO, video_features(1, CLIPS))


def test_verify_names_a_video_with_parts_missing_and_gc_keeps_committed_parts(tmp_path):
    location = tmp_path / "s.zarr"
    fs = FeatureStore.create(location, make_meta())
    fs.record_plan([{"video_id": VIDEO, "parts": PARTS}])
    write_part(fs, 0)
    write_part(fs, 2)
    result = CliRunner().invoke(main, ["store", "verify", str(location)])
    assert result.exit_code == 1
    assert f"missing: {VIDEO}: 2 of 3 parts committed; run extract again" in result.output
    # the committed parts' attempts are in use until the video is committed
    assert fs.leftovers(0) == [] and len(used_attempts(fs)) == 2
    with pytest.raises(ValueError, match="HDF5|hdf5"):
        FeatureStore.create(tmp_path / "s.h5", make_meta()).part_writer(
            VIDEO, 0, PARTS, CLIPS, video_info(CLIPS))


@pytest.fixture
def s3(monkeypatch):
    with moto_server(monkeypatch) as options:
        yield options


@pytest.mark.slow
def test_parts_on_s3_race_and_assemble_once(s3, tmp_path):
    fs = check_race_flow(f"s3://{BUCKET}/parts.zarr", tmp_path / "go", s3)
    left = sorted(path.split("/")[0] for path, _ in fs.leftovers(0))
    assert left == ["attempts"] * 3 + ["parts"]  # the parts' attempts and records, now copied


# -- shards of `extract` splitting a long video ------------------------------------------------
# At parts of 1.5 s: "long" (4.3 s, 29 clips) is 3 parts, the others whole.
PART_VIDEOS = {"long.mp4": (130, 30), "mid.mkv": (40, 30), "short.avi": (20, 30)}
SPLIT = {PART_SECONDS_ENV: "1.5"}


@pytest.fixture(scope="module")
def part_videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("part_videos")
    return folder, write_videos(folder, PART_VIDEOS)


@pytest.fixture(scope="module")
def one_process(part_videos, tmp_path_factory):
    path = tmp_path_factory.mktemp("one") / "one.zarr"
    summary = run_extraction(settings_for(part_videos[1], path, batch_size=3),
                             show_progress=False)
    assert sorted(summary.done) == ["long", "mid", "short"] and summary.parts == []
    return store_contents(path)


def shards(folder, store, backbone, count, *extra, env=None, **options):
    return [start_shard(folder, store, backbone, "--shard", f"{index}/{count}", *extra,
                        env={**SPLIT, **(env or {})}, **options) for index in range(count)]


def parts_extracted(stdout) -> int:
    found = [line for line in stdout.splitlines() if " parts of long videos" in line]
    return int(found[0].split(" and ")[1].split()[0]) if found else 0


def read_while_running(store, processes, expected):
    """Whatever a reader lists while they run reads whole, as one process wrote it."""
    while any(process.poll() is None for process in processes):
        if Path(store, "zarr.json").exists():
            listed = store_contents(store)
            assert_same_contents(listed, {vid: expected[vid] for vid in listed})
        time.sleep(0.2)


def finish_like_one_process(store, processes, one_process) -> list:
    """Their outputs, once they ended well while a reader read whatever was listed; the store
    then equals one process's, and `store verify` is clean."""
    read_while_running(store, processes, one_process)
    outputs = finish_all(processes)
    assert_same_contents(store_contents(store), one_process)
    result = CliRunner().invoke(main, ["store", "verify", str(store)])
    assert result.exit_code == 0, result.output
    return outputs


@pytest.mark.slow
def test_shards_split_a_long_video_into_parts_and_equal_one_process(
        part_videos, one_process, backbone_file, tmp_path):
    folder, videos = part_videos
    store = tmp_path / "s.zarr"
    # with a decoding worker each: parts travel to workers through the queue
    outputs = finish_like_one_process(
        store, shards(folder, store, backbone_file, 3, "--num-workers", 1), one_process)
    plan = {entry["video_id"]: entry for entry in FeatureStore.open(store).planned_videos()}
    assert {vid: entry["parts"] for vid, entry in plan.items()} == \
        {"long": 3, "mid": 1, "short": 1}
    assert sum(map(extracted, outputs)) == 3  # each video committed once (long: assembled)
    assert sum(map(parts_extracted, outputs)) == 3  # each part committed once
    assert sorted(p.name for p in (store / "parts" / "long").iterdir()) == ["0", "1", "2"]


@pytest.mark.slow
def test_a_shard_killed_before_a_part_commit_is_resumed_by_another_number(
        part_videos, one_process, backbone_file, tmp_path):
    folder, videos = part_videos
    store = tmp_path / "s.zarr"
    # Its first item is the longest: a part of "long". It dies once that part is written.
    victim = start_shard(folder, store, backbone_file, "--shard", "0/2",
                         env={**SPLIT, KILL_AT_ENV: "commit:1"})
    victim.communicate(timeout=600)
    assert victim.returncode == -signal.SIGKILL
    fs = FeatureStore.open(store)
    assert fs.videos() == [] and fs.committed_parts(["long"]) == {}
    assert fs.incomplete_videos() == ["long"]  # its written part, which no reader sees
    # ... by three shards whose locks are refused: only the work order and the commits of
    # parts and videos keep them apart
    outputs = finish_like_one_process(
        store, shards(folder, store, backbone_file, 3, program=WITHOUT_LOCKS), one_process)
    assert sum(map(extracted, outputs)) == 3 and sum(map(parts_extracted, outputs)) == 3


@pytest.mark.slow
def test_shards_killed_before_the_assembly_are_finished_by_one_process(
        part_videos, one_process, backbone_file, tmp_path):
    folder, videos = part_videos
    store = tmp_path / "s.zarr"
    # Whoever finds all parts of "long" committed (the writer of the last one, or a shard that
    # meets them later) dies before assembling it.
    processes = shards(folder, store, backbone_file, 2, env={KILL_AT_ENV: "assemble:1"})
    for process in processes:
        process.communicate(timeout=600)
    assert -signal.SIGKILL in [process.returncode for process in processes]
    fs = FeatureStore.open(store)
    assert "long" not in fs.videos() and fs.committed_parts(["long"]) == {"long": {0, 1, 2}}
    result = CliRunner().invoke(main, ["store", "verify", str(store)])
    assert result.exit_code == 1
    assert "missing: long: 3 of 3 parts committed; run extract again" in result.output
    # One process (it takes whole videos) assembles "long" from the parts, encoding none of
    # its clips again, and extracts what the dead shards left.
    left = [vid for vid in ("mid", "short") if vid not in fs.videos()]
    resumed, = finish_like_one_process(store, [start_shard(folder, store, backbone_file,
                                                           env=SPLIT)], one_process)
    assert extracted(resumed) == 1 + len(left) and parts_extracted(resumed) == 0
    clips = sum(one_process[vid][0]["num_clips"] for vid in left)
    assert f"({clips} clips, " in resumed


def test_a_video_of_fewer_clips_than_parts_commits_empty_parts(tmp_path, monkeypatch):
    """Two clips planned in four parts (a duration that overstates the video): parts 0 and 2
    are empty, committed all the same, and the assembled video equals one process's."""
    videos = write_videos(tmp_path / "videos", {"tiny.mp4": (20, 30)})
    one = tmp_path / "one.zarr"
    run_extraction(settings_for(videos, one), show_progress=False)
    monkeypatch.setenv(PART_SECONDS_ENV, "0.2")
    store = tmp_path / "s.zarr"
    summaries = []
    for index in (0, 1):  # shard 0 leaves shard 1's first part to it, which then ends the work
        settings = settings_for(videos, store)
        settings.shard = Shard(index, 2, "test")
        summaries.append(run_extraction(settings, show_progress=False))
    assert FeatureStore.open(store).planned_videos()[0]["parts"] == 4
    assert sorted(part for summary in summaries for part in summary.parts) == \
        [("tiny", part) for part in range(4)]
    assert [summary.done for summary in summaries] == [[], ["tiny"]]
    assert_same_contents(store_contents(store), store_contents(one))
