"""Shards (extract/shards.py): which shard the launcher makes a process, the order in which each
shard takes the store's planned videos, several ``extract --shard i/n`` processes writing one
Zarr store and a resume with another n (bit-identical to one process), and a file that is not
the one the store planned under its id.
"""
import os
import random
import shutil

import pytest
from click.testing import CliRunner

from cli import main
from extract.pipeline import format_summary, run_extraction
from extract.shards import SINGLE, Shard, Shares, launcher_shard, shares, work_order
from helpers.extraction import (WITHOUT_LOCKS, assert_same_contents, extracted, finish_all,
                                settings_for, start_shard, store_contents, write_videos)
from helpers.videos import write_video
from losa_tal import InputError
from store import FeatureStore

# Six videos of 2 to 27 clips (batches of 3 split them): shards get different shares.
SHARD_VIDEOS = {"v0.mkv": (120, 30), "v1.mp4": (90, 25), "v2.avi": (64, 30), "v3.mkv": (40, 30),
                "v4.mp4": (30, 25), "v5.mkv": (20, 30)}


# -- the launcher ------------------------------------------------------------------------------
@pytest.mark.parametrize("env, expected", [
    ({}, (0, 1, "one process")),
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}, (3, 8, "torchrun")),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "6"}, (5, 6, "Slurm tasks")),
    # torchrun under srun: the Slurm tasks are torchrun's agents, RANK already counts them
    ({"RANK": "9", "WORLD_SIZE": "16", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"},
     (9, 16, "torchrun")),
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0"},
     (3, 4, "Slurm job array")),
    # --array=1-4: ids from 1
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"},
     (0, 4, "Slurm job array")),
    ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"},
     (3, 4, "Slurm job array")),
    # --array=10-40:10
    ({"SLURM_ARRAY_TASK_ID": "30", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "10",
      "SLURM_ARRAY_TASK_MAX": "40", "SLURM_ARRAY_TASK_STEP": "10"}, (2, 4, "Slurm job array")),
    # an array of 4 jobs, each srun with 2 tasks: task 2 (ids from 1), process 1 -> 3 of 8
    ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1",
      "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, (3, 8, "Slurm job array x Slurm tasks")),
    # an array of 3 jobs, each torchrun --nnodes over 4 processes: job 2, rank 1 -> 9 of 12
    ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "0",
      "RANK": "1", "WORLD_SIZE": "4", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"},
     (9, 12, "Slurm job array x torchrun")),
])
def test_the_launcher_decides_the_shard(env, expected):
    shard = launcher_shard(env)
    assert (shard.index, shard.count, shard.source) == expected
    assert str(shard) == f"shard {expected[0]}/{expected[1]} ({expected[2]})"


def test_an_explicit_shard_wins_over_the_launcher():
    env = {"RANK": "1", "WORLD_SIZE": "2", "SLURM_ARRAY_TASK_ID": "0",
           "SLURM_ARRAY_TASK_COUNT": "2"}
    assert launcher_shard(env, explicit=" 5/7 ") == Shard(5, 7, "--shard")
    assert launcher_shard({}) == SINGLE


@pytest.mark.parametrize("env, named", [
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK: expected an integer, got 'x'"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK: 2 is not a rank of WORLD_SIZE=2"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": ""}, "SLURM_NTASKS: expected an integer"),
    # --array=1,4,9: ids that are no range, refused by every task
    ({"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1"},
     "SLURM_ARRAY_TASK_ID: task 9 is not one of 3 tasks numbered from 1 in steps of 1"),
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1",
      "SLURM_ARRAY_TASK_MAX": "9"}, "SLURM_ARRAY_TASK_ID: task 1 is not one of 3 tasks"),
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0",
      "SLURM_ARRAY_TASK_STEP": "2"}, "SLURM_ARRAY_TASK_ID: task 3 is not one of 4 tasks"),
])
def test_a_launcher_environment_that_names_no_shard_is_one_line(env, named):
    with pytest.raises(InputError) as error:
        launcher_shard(env)
    message = str(error.value)
    assert message.startswith(named) and "\n" not in message


@pytest.mark.parametrize("value", ["3/2", "2/2", "-1/4", "0/0", "1", "a/b", "1/2/3", ""])
def test_a_bad_shard_flag_is_refused_in_one_line(value, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    result = CliRunner().invoke(main, ["extract", "--videos", videos, "--out",
                                       tmp_path / "s.zarr", "--random-init", "--shard", value])
    assert result.exit_code == 2, result.output
    assert result.output == f"error: --shard: expected i/n with 0 <= i < n (e.g. 0/8), got " \
                            f"{value!r}\n"
    assert not (tmp_path / "s.zarr").exists()


# -- the order of work -------------------------------------------------------------------------
def random_plan(seed, size):
    rng = random.Random(seed)
    durations = [None, 0, 5.0, 5.0] + [rng.lognormvariate(5, 0.8) for _ in range(size)]
    return [{"video_id": f"v{index:03d}", "duration": duration}
            for index, duration in enumerate(durations)]


@pytest.mark.parametrize("seed, size, count", [(0, 40, 1), (1, 40, 3), (2, 100, 8),
                                               (3, 5, 16), (4, 0, 4)])
def test_every_shard_orders_every_video_once_its_own_share_first(seed, size, count):
    plan = random_plan(seed, size)
    ids = sorted(entry["video_id"] for entry in plan)
    duration = {entry["video_id"]: entry["duration"] or 0 for entry in plan}
    owned = shares(plan, count)
    assert sorted(sum(owned, [])) == ids  # the shares split the plan
    loads = [sum(duration[video] for video in share) for share in owned]
    assert max(loads) - min(loads) <= max(duration.values())  # balanced within one video
    for index in range(count):
        order = work_order(plan, Shard(index, count, "test"))
        assert sorted(order) == ids
        own = owned[index]
        assert order[:len(own)] == own
        assert [duration[video] for video in own] == sorted(
            (duration[video] for video in own), reverse=True)  # longest first
        # then the next shard's share from its end
        if count > 1:
            following = owned[(index + 1) % count]
            assert order[len(own):len(own) + len(following)] == following[::-1]


def test_the_order_depends_on_the_plan_and_the_shard_only():
    plan = random_plan(5, 60)
    shuffled = plan[::-1]
    random.Random(1).shuffle(shuffled)
    for index in range(6):
        assert work_order(plan, Shard(index, 6, "a")) == work_order(shuffled, Shard(index, 6, "b"))
    # another n (a resume) orders every video all the same
    assert sorted(work_order(plan, Shard(2, 5, "x"))) == sorted(work_order(plan, Shard(0, 1, "x")))


def test_other_shards_leave_alone_what_an_owner_is_on():
    plan = [{"video_id": f"v{index}", "duration": 10.0 - index} for index in range(6)]
    split = Shares(plan, 2)
    assert split.owned == [["v0", "v3", "v4"], ["v1", "v2", "v5"]]
    assert split.at_work(set(), but=0) == {"v1"}
    assert split.at_work({"v1", "v5"}, but=0) == {"v2"}
    assert split.at_work({"v1", "v5"}, but=0, depth=2) == {"v2"}
    assert split.at_work(set(), but=1, depth=2) == {"v0", "v3"}
    assert split.at_work({"v1", "v2", "v5"}, but=0) == set()  # its share is done


# -- several processes, one store ------------------------------------------------------------
@pytest.fixture(scope="module")
def shard_videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shard_videos")
    return folder, write_videos(folder, SHARD_VIDEOS)


@pytest.fixture(scope="module")
def one_process(shard_videos, tmp_path_factory):
    path = tmp_path_factory.mktemp("one") / "one.zarr"
    summary = run_extraction(settings_for(shard_videos[1], path, batch_size=3),
                             show_progress=False)
    assert sorted(summary.done) == sorted(vid for vid, _ in shard_videos[1])
    return store_contents(path)


@pytest.mark.slow
def test_shards_then_a_resume_with_another_n_equal_one_process(shard_videos, one_process,
                                                                backbone_file, tmp_path):
    folder, videos = shard_videos
    store = tmp_path / "s.zarr"
    # Three shards of a Slurm job array (--array=1-3) of which the last never runs...
    array = [start_shard(folder, store, backbone_file, env={
        "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": "3",
        "SLURM_ARRAY_TASK_MIN": "1"}) for task in (1, 2)]
    first = finish_all(array)
    assert [out.splitlines()[0] for out in first] == [
        "shard 0/3 (Slurm job array)", "shard 1/3 (Slurm job array)"]
    plan = FeatureStore.open(store).planned_videos()
    assert sorted(entry["video_id"] for entry in plan) == sorted(vid for vid, _ in videos)
    missing = [vid for vid in shares(plan, 3)[2][:1]]  # its first video: left to it
    assert sorted(FeatureStore.open(store).videos()) == sorted(
        vid for vid, _ in videos if vid not in missing)
    assert all("left to the shards they belong to" in out for out in first)
    # ... then a resume with two shards, started with --shard
    second = finish_all([start_shard(folder, store, backbone_file, "--shard", f"{index}/2")
                         for index in range(2)])
    assert [out.splitlines()[0] for out in second] == ["shard 0/2 (--shard)",
                                                       "shard 1/2 (--shard)"]
    assert sum(map(extracted, first + second)) == len(videos)  # each video encoded once
    assert FeatureStore.open(store).planned_videos() == plan  # the plan was kept
    assert_same_contents(store_contents(store), one_process)
    result = CliRunner().invoke(main, ["store", "verify", str(store)])
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_shards_started_together_plan_once_and_encode_each_video_once(
        shard_videos, one_process, backbone_file, tmp_path):
    folder, videos = shard_videos
    store = tmp_path / "s.zarr"
    outputs = finish_all([start_shard(folder, store, backbone_file, "--shard", f"{index}/3")
                          for index in range(3)])
    assert sum(map(extracted, outputs)) == len(videos)
    assert len(FeatureStore.open(store).planned_videos()) == len(videos)
    assert_same_contents(store_contents(store), one_process)


@pytest.mark.slow
def test_shards_without_locks_commit_each_video_once(shard_videos, one_process, backbone_file,
                                                     tmp_path):
    folder, videos = shard_videos
    store = tmp_path / "s.zarr"
    processes = [start_shard(folder, store, backbone_file, "--shard", f"{index}/3",
                             program=WITHOUT_LOCKS) for index in range(3)]
    errors = []
    outputs = finish_all(processes, errors)
    assert all("file locks are refused here" in stderr for stderr in errors)
    assert sum(map(extracted, outputs)) == len(videos)  # a second copy is never committed
    assert_same_contents(store_contents(store), one_process)


# -- the source of a video ---------------------------------------------------------------------
def test_another_file_under_a_planned_id_is_refused_and_a_copy_is_not(tmp_path):
    folder = tmp_path / "videos"
    videos = write_videos(folder, {"a.mkv": (40, 30), "b.mp4": (30, 25)})
    store = tmp_path / "s.zarr"
    # shard 0 of 2 extracts its share; the other video stays planned, not extracted
    settings = settings_for(videos, store)
    settings.shard = Shard(0, 2, "test")
    first = run_extraction(settings, show_progress=False)
    (done,), (left,) = first.done, first.left
    before = store_contents(store)
    # a copy of the extracted file (new modification time, same bytes) is the same source
    path = dict(videos)
    shutil.copyfile(path[done], str(path[done]) + ".tmp")
    os.replace(str(path[done]) + ".tmp", path[done])
    # another video under each id
    replaced = {left}
    write_video(path[left], 50, fps=30, seed=7)
    summary = run_extraction(settings_for(videos, store), show_progress=False)
    assert summary.already == [done] and summary.done == [] and set(summary.failed) == replaced
    assert summary.failed[left].startswith(f"{path[left]} is not the file this store planned as "
                                           f"video {left!r} ({path[left]}, ")
    assert "extract this file into a new store" in summary.failed[left]
    assert "\n" not in format_summary(summary).split("\n")[1]
    # now the extracted one
    write_video(path[done], 44, fps=30, seed=8)
    summary = run_extraction(settings_for(videos, store), show_progress=False)
    assert set(summary.failed) == {done, left} and not summary.done
    assert_same_contents(store_contents(store), before)  # nothing replaced
    record = FeatureStore.open(store).video_info(done)
    assert set(record["source"]) == {"size", "mtime", "sha256_first_last_mib"}
