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
import json
import shutil
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
