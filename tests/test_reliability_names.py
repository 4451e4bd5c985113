"""Names that are not what they seem: in a video folder, a file name that is not UTF-8, a
symbolic link to nothing and a directory, each with a video extension; in a store, an id with a
newline, and ids that spell the store's own file names (``zarr.json...``). Each must be reported
by name, shown escaped or kept under a name of its own, never a codec error, silence, a lost
video or a broken table."""
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from helpers.extraction import TINY, cli_args
from helpers.videos import write_video
from store import LAST, FeatureStore


def test_unusable_entries_of_a_video_folder_are_named_and_the_rest_extracted(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "good.mp4", 20)
    write_video(videos / "latin1.mp4", 20, seed=1)
    os.rename(os.fsencode(videos / "latin1.mp4"), os.fsencode(videos) + b"/caf\xe9.mp4")
    (videos / "folder.mp4").mkdir()
    os.symlink(tmp_path / "nowhere.mp4", videos / "gone.mkv")
    backbone = tmp_path / "tiny.json"
    backbone.write_text(json.dumps(TINY))
    result = CliRunner().invoke(cli.main, cli_args(videos, tmp_path / "s.zarr", backbone))
    assert result.exit_code == 0, result.output
    assert "extracted 2 videos" in result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning: ")]
    for name, problem in (("caf\\xe9.mp4", "not UTF-8; its video id is 'caf\\\\xe9'"),
                          ("folder.mp4", "a directory"),
                          ("gone.mkv", "a symbolic link to nothing")):
        assert any(name in line and problem in line for line in warnings), (name, warnings)
    # The id is text any JSON file can hold: predictions, annotations, store records.
    assert FeatureStore.open(tmp_path / "s.zarr").videos() == ["caf\\xe9", "good"]


def test_store_info_shows_an_id_with_a_newline_on_one_row(tmp_path):
    meta = {"backbone": {"preset": None, "kwargs": {}, "checkpoint": None,
                         "random_init_seed": None},
            "protocol": {"clip_len": 16, "frame_interval": 1, "clip_stride": 4},
            "layers": [], "tokens": None, "feature_dim": 4, "dtype": "float32"}
    fs = FeatureStore.create(tmp_path / "s.zarr", meta)
    for vid in ("plain", "two\nlines", "tab\there"):
        fs.write_video(vid, {LAST: np.ones((3, 4), np.float32)}, np.array([0.3, 0.4, 0.5]),
                       {"fps": 30.0})
    result = CliRunner().invoke(cli.main, ["store", "info", str(tmp_path / "s.zarr")])
    assert result.exit_code == 0, result.output
    rows = result.output.splitlines()[-3:]
    assert [row.split()[0] for row in rows] == ["plain", "'tab\\there'", "'two\\nlines'"], rows


# Ids that spell Zarr's metadata file or start like it (or its temporaries), in any case.
METADATA_LIKE_IDS = ["zarr.json", "zarr.json.bak", "ZARR.JSON", "Zarr.Json.tmp", "zarr.jsonl",
                     "zarr", "video_test_0000004"]


@pytest.mark.parametrize("store_format", ["zarr", "hdf5"])
def test_ids_that_spell_the_stores_own_names_are_imported_listed_and_exported(tmp_path,
                                                                                store_format):
    features = tmp_path / "features"
    features.mkdir()
    rng = np.random.default_rng(0)
    arrays = {vid: rng.standard_normal((6, 4)).astype(np.float32) for vid in METADATA_LIKE_IDS}
    for vid, values in arrays.items():
        np.save(features / f"{vid}.npy", values)
    store = tmp_path / ("s.zarr" if store_format == "zarr" else "s.h5")
    runner = CliRunner()
    imported = runner.invoke(cli.main, ["store", "import", str(features), "--out", str(store),
                                        "--fps", "30"])
    assert imported.exit_code == 0 and "Traceback" not in imported.output, imported.output
    assert f"imported {len(arrays)} video(s)" in imported.output, imported.output
    with FeatureStore.open(store) as fs:
        assert fs.videos() == sorted(arrays)
    verified = runner.invoke(cli.main, ["store", "verify", str(store)])
    assert verified.exit_code == 0, verified.output
    assert f"{len(arrays)} video(s) checked, 0 bad" in verified.output
    exported = runner.invoke(cli.main, ["store", "export", str(store), "--out",
                                        str(tmp_path / "out")])
    assert exported.exit_code == 0, exported.output
    again = runner.invoke(cli.main, ["store", "import", str(tmp_path / "out"), "--out",
                                     str(tmp_path / "again.zarr"), "--fps", "30"])
    assert again.exit_code == 0, again.output
    with FeatureStore.open(tmp_path / "again.zarr") as fs:
        assert fs.videos() == sorted(arrays)  # names decode back to the ids
        for vid, values in arrays.items():
            np.testing.assert_array_equal(fs.read(vid)[LAST], values)
    if store_format == "zarr":  # no name looks like Zarr's own; ordinary names are unchanged
        names = {path.name for path in (store / "commits").iterdir()}
        assert len(names) == len(arrays) and {"video_test_0000004", "zarr"} <= names, names
        assert not any(name.lower().startswith("zarr.json") for name in names), names
