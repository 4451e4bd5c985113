"""Names that are not what they seem: in a video folder, a file name that is not UTF-8, a
symbolic link to nothing and a directory, each with a video extension; in a store, an id with a
newline. Each must be reported by name or shown escaped, never a codec error, silence, or a
broken table."""
import json
import os

import numpy as np
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
