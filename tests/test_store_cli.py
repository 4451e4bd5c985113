"""``store info | verify | export | import`` through the real command line, on real THUMOS-14
annotation files (ActionFormer and OpenTAD layouts) and feature files written by the tests."""
import json
import os
import re

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from helpers.evaluation_inputs import ACTIONFORMER_FILE as ACTIONFORMER
from helpers.evaluation_inputs import OPENTAD_FILE as OPENTAD
from helpers.evaluation_inputs import needs_thumos
from helpers.stores import as_stored, files_under, make_meta, video_dir, write_video
from store import LAST, FeatureStore

# A 29.97 fps video, a 30 fps one, and a 25 fps one.
VIDEOS = ["video_test_0000591", "video_validation_0000051", "video_test_0001058"]
FEATURE_DIM = 16


def error_lines(result) -> list[str]:
    """The ``error:`` lines on stderr (progress bars share it, with carriage returns)."""
    return [line for line in re.split("[\r\n]", result.stderr) if line.startswith("error:")]


def run(*args):
    result = CliRunner().invoke(main, [str(arg) for arg in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def published_style_features(directory, annotation_file=ACTIONFORMER) -> dict:
    """[T, D] float32 .npy files, T as the official extraction gives for each annotated video
    (``range(0, num_frames - 15, 4)``; D kept small)."""
    database = json.load(open(annotation_file))["database"]
    os.makedirs(directory, exist_ok=True)
    arrays = {}
    for seed, vid in enumerate(VIDEOS):
        entry = database[vid]
        fps = entry.get("fps") or entry["frame"] / entry["duration"]
        num_frames = entry.get("frame") or round(entry["duration"] * fps)
        num_clips = len(range(0, num_frames - 15, 4))
        arrays[vid] = np.random.default_rng(seed).standard_normal(
            (num_clips, FEATURE_DIM)).astype(np.float32)
        np.save(os.path.join(directory, vid + ".npy"), arrays[vid])
    return arrays


@pytest.mark.parametrize("annotation_file", [ACTIONFORMER, OPENTAD])
@needs_thumos
def test_import_then_export_round_trips_published_features(tmp_path, annotation_file):
    arrays = published_style_features(tmp_path / "published", annotation_file)
    store = tmp_path / "thumos.zarr"
    result = run("store", "import", tmp_path / "published", "--out", store, "--annotations",
                 annotation_file, "--clip-len", 16, "--clip-stride", 4, "--backbone", "vit_g")
    assert result.exit_code == 0, result.output
    assert "imported 3 video(s)" in result.stdout and "warning" not in result.stderr

    fs = FeatureStore.open(store)
    assert fs.videos() == sorted(VIDEOS) and fs.layers == [] and fs.meta["dtype"] == "float32"
    assert fs.meta["protocol"]["clip_len"] == 16 and fs.meta["protocol"]["clip_stride"] == 4
    assert fs.meta["backbone"]["preset"] == "vit_g"
    database = json.load(open(annotation_file))["database"]
    for vid, array in arrays.items():
        entry = database[vid]
        fps = entry.get("fps") or entry["frame"] / entry["duration"]
        info = fs.video_info(vid)
        assert info["fps"] == pytest.approx(fps) and info["duration"] == entry["duration"]
        steps = np.arange(len(array))
        np.testing.assert_allclose(fs.feature_times(vid), (4 * steps + 8) / fps, rtol=1e-12)
        np.testing.assert_array_equal(fs.read(vid)[LAST], array)

    # Again: everything is already there; but not with another backbone recorded.
    again = ["store", "import", tmp_path / "published", "--out", store, "--annotations",
             annotation_file]
    assert "imported 0 video(s)" in run(*again, "--backbone", "vit_g").stdout
    result = run(*again)
    assert result.exit_code == 2 and "backbone.preset (store: \"vit_g\", requested: null)" \
        in result.stderr
    result = run("store", "export", store, "--out", tmp_path / "exported")
    assert result.exit_code == 0, result.output
    for vid, array in arrays.items():
        exported = np.load(tmp_path / "exported" / f"{vid}.npy", allow_pickle=False)
        assert exported.dtype == np.float32
        np.testing.assert_array_equal(exported, array)


@needs_thumos
def test_import_with_one_fps_into_hdf5_in_float16(tmp_path):
    arrays = published_style_features(tmp_path / "published")
    result = run("store", "import", tmp_path / "published", "--out", tmp_path / "s.h5",
                 "--fps", 25, "--dtype", "float16", "--clip-stride", 8)
    assert result.exit_code == 0, result.output
    fs = FeatureStore.open(tmp_path / "s.h5")
    assert fs.format == "hdf5" and fs.meta["dtype"] == "float16"
    vid = VIDEOS[0]
    assert fs.video_info(vid)["duration"] is None  # no annotation: not known, not invented
    np.testing.assert_allclose(fs.feature_times(vid)[:3], [8 / 25, 16 / 25, 24 / 25])
    np.testing.assert_array_equal(fs.read(vid)[LAST], as_stored(arrays[vid]))


def test_export_of_an_intermediate_layer_averages_its_tokens(tmp_path):
    fs = FeatureStore.create(tmp_path / "s.zarr", make_meta())
    features = write_video(fs, "a/../b", 0, 7)
    result = run("store", "export", tmp_path / "s.zarr", "--out", tmp_path / "out", "--layer", 5)
    assert result.exit_code == 0, result.output
    assert os.listdir(tmp_path / "out") == ["a%2F..%2Fb.npy"]  # inside the output directory
    exported = np.load(tmp_path / "out" / "a%2F..%2Fb.npy", allow_pickle=False)
    np.testing.assert_allclose(exported, as_stored(features[5]).mean(axis=1), rtol=1e-6)
    # Importing an export gives back the same (hostile) id.
    result = run("store", "import", tmp_path / "out", "--out", tmp_path / "back.zarr", "--fps", 30)
    assert result.exit_code == 0, result.output
    assert FeatureStore.open(tmp_path / "back.zarr").videos() == ["a/../b"]


def test_info_and_verify(tmp_path):
    fs = FeatureStore.create(tmp_path / "s.zarr", make_meta())
    write_video(fs, "v1", 0, 12)
    write_video(fs, "v2", 1, 30)
    summary = json.loads(run("store", "info", tmp_path / "s.zarr", "--json").stdout)
    assert summary["num_videos"] == 2 and summary["num_clips"] == 42
    assert summary["videos"]["v2"] == {"num_clips": 30, "fps": 30.0, "duration": 132 / 30,
                                       "float32_layers": []}
    assert summary["meta"]["layers"] == [2, 5] and summary["format"] == "zarr"
    text = run("store", "info", tmp_path / "s.zarr").stdout
    assert "vit_s, checkpoint vit_s.pth" in text and "v2" in text and "4.40s" in text

    result = run("store", "verify", tmp_path / "s.zarr")
    assert result.exit_code == 0 and "2 video(s) checked, 0 bad" in result.stdout
    chunk = video_dir(tmp_path / "s.zarr", "v2") / "layer_2" / "c" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-9])  # truncated chunk
    result = run("store", "verify", tmp_path / "s.zarr")
    assert result.exit_code == 1
    assert "bad: v2: cannot read layer_2" in result.stdout and "1 bad" in result.stdout


def _pickle_bomb(path, marker):
    """An object-array .npy whose unpickling would create ``marker``."""

    class Bomb:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    np.save(path, np.array([Bomb()], dtype=object), allow_pickle=True)


@pytest.mark.parametrize("content, problem", [
    ("pickle", "not a readable .npy array"),
    (np.zeros(5, np.float32), "expected a \\[T, D\\] floating-point array"),
    (np.zeros((5, FEATURE_DIM), np.int32), "floating-point"),
    (np.zeros((0, FEATURE_DIM), np.float32), "holds no features"),
    (np.full((5, FEATURE_DIM), np.nan, np.float32), "contains NaN or inf"),
    (np.zeros((5, FEATURE_DIM + 1), np.float32), "has 17 channels, the other files 16"),
    (b"", "not a readable .npy array"),
    (b"\x93NUMPY garbage", "not a readable .npy array"),
])
@needs_thumos
def test_import_refuses_bad_feature_files_by_name(tmp_path, content, problem):
    source = tmp_path / "features"
    published_style_features(source)
    bad = source / "zz_bad.npy"
    marker = tmp_path / "pwned"
    if isinstance(content, str):
        _pickle_bomb(bad, marker)
    elif isinstance(content, bytes):
        bad.write_bytes(content)
    else:
        np.save(bad, content)
    result = run("store", "import", source, "--out", tmp_path / "s.zarr", "--fps", 30)
    assert result.exit_code == 2
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: "), result.stderr
    assert re.search(problem, lines[0]) and "Traceback" not in result.output
    assert not marker.exists()
    # The good files before it were imported and are intact; nothing was written outside.
    assert FeatureStore.open(tmp_path / "s.zarr").videos() == sorted(VIDEOS)
    assert all(path.startswith((str(source), str(tmp_path / "s.zarr")))
               for path in files_under(tmp_path))


@pytest.mark.parametrize("args, problem", [
    (["store", "info", "{tmp}/missing"], "{tmp}/missing: no such feature store"),
    (["store", "verify", "{tmp}/features"], "{tmp}/features: is a directory but not a Zarr"),
    (["store", "import", "{tmp}/features", "--out", "{tmp}/s.zarr"],
     "no frame rate for video 'video_test_0000591'"),
    (["store", "import", "{tmp}/features", "--out", "{tmp}/s.zarr", "--fps", "-1"],
     "--fps: must be a positive number"),
    (["store", "import", "{tmp}/nothing", "--out", "{tmp}/s.zarr", "--fps", "30"],
     "{tmp}/nothing: no such directory"),
    (["store", "import", "{tmp}/features", "--out", "{tmp}/s.zarr", "--fps", "30",
      "--clip-stride", "0"], "clip_stride: must be a positive integer"),
    (["store", "export", "{tmp}/s.zarr", "--out", "{tmp}/x", "--layer", "mean"],
     "--layer: expected 'last' or a block index"),
])
@needs_thumos
def test_bad_command_lines_get_one_line_errors(tmp_path, args, problem):
    published_style_features(tmp_path / "features")
    result = run(*[arg.format(tmp=tmp_path) for arg in args])
    assert result.exit_code == 2, result.output
    lines = error_lines(result)
    assert len(lines) == 1 and problem.format(tmp=tmp_path) in lines[0], result.stderr
