"""``cli.py videos check``: one report line per video, a JSON report, exit 1 when a video would
be extracted wrongly. Every case is a real file written with PyAV."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from extract import decoding
from helpers.indexed_videos import (can_encode, write_cut_before_keyframe, write_indexed,
                                    write_trimmed)
from helpers.videos import write_random_bytes, write_truncated, write_video
from store.protocol import SamplingProtocol

VFR_TIMES = np.cumsum([0.0] + [0.02, 0.05, 0.03] * 20)[:60]


def run(*args):
    result = CliRunner().invoke(main, ["videos", "check", *map(str, args), "--quiet"])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def annotations(path, durations: dict):
    database = {vid: {"subset": "test", "duration": d, "annotations": []}
                for vid, d in durations.items()}
    path.write_text(json.dumps({"database": database}))
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """One video of each kind the check tells apart."""
    root = tmp_path_factory.mktemp("check")
    videos = root / "videos"
    videos.mkdir()
    write_indexed(videos / "open_gop.mkv", 150, "h264_open_gop", fps=30000 / 1001)
    if can_encode("av1"):
        write_indexed(videos / "av1.mkv", 30, "av1")
    full = write_indexed(root / "full.mp4", 90, "h264_closed_gop")
    write_trimmed(videos / "trimmed.mp4", full, cut=15)
    write_cut_before_keyframe(videos / "midgop.mkv", full, drop=15)
    write_indexed(videos / "vfr.mkv", 60, "ffv1_lossless", frame_times=VFR_TIMES)
    write_video(root / "long.mkv", 90)
    write_truncated(videos / "cut.mkv", root / "long.mkv", keep=0.5)
    write_random_bytes(videos / "noise.mp4")
    write_video(videos / "w72.mkv", 20, width=72)  # a width decord 0.6 cannot copy
    return root


def test_each_case_gets_its_status_and_one_line_reason(folder, tmp_path):
    durations = {"open_gop": 5.0, "av1": 1.0, "trimmed": 2.5, "midgop": 2.0, "vfr": 2.0,
                 "cut": 3.0, "noise": 5.0, "w72": 0.67, "gone": 4.0}
    gt = annotations(tmp_path / "gt.json", durations)
    report = tmp_path / "out" / "report.json"
    result = run(folder / "videos", "--annotations", gt, "--json", report)
    assert result.exit_code == 1, result.output
    records = {r["video"]: r for r in json.loads(report.read_text())["videos"]}
    expected = {"open_gop": "ok", "trimmed": "ok", "midgop": "ok", "vfr": "ok", "cut": "wrong",
                "noise": "fails", "w72": "ok",
                **({"av1": "ok"} if can_encode("av1") else {})}
    assert {vid: r["status"] for vid, r in records.items()} == expected
    assert records["open_gop"]["decoder"]["name"] == "decord" and not records["open_gop"]["reason"]
    assert records["open_gop"]["probe_mismatches"] == 0 and records["open_gop"]["probe_frames"]
    trimmed = records["trimmed"]
    assert (trimmed["frames_counted"], trimmed["frames_decoded"]) == (90, 75)
    assert trimmed["reason"] == ("edit list hides 15 frames (decord counts 90, 75 shown); "
                                 "read by PyAV")
    assert records["midgop"]["reason"] == ("cut before its first keyframe: 15 frames never "
                                           "decode (decord counts 75, 60 shown); read by PyAV")
    assert records["w72"]["reason"] == "decord fails on its frames; read by PyAV"
    vfr = records["vfr"]
    assert vfr["frame_rate"] == "variable" and vfr["decoder"]["name"] == "pyav"
    assert vfr["fps_measured"] == pytest.approx(30, abs=0.1)
    assert vfr["reason"].startswith("variable frame rate (")
    assert records["cut"]["reason"].startswith("decodes to 1.") and \
        records["cut"]["reason"].endswith("the annotations say 3.00 s (a truncated file?)")
    assert records["noise"]["reason"].startswith("cannot open: ")
    if "av1" in records:
        assert records["av1"]["codec"] == "av1" and records["av1"]["frames_decoded"] == 30
        assert records["av1"]["reason"] == "decord cannot open av1; read by PyAV"
    lines = result.output.splitlines()
    assert lines[0].startswith("video ") and len(lines) == 1 + len(records) + 2
    for vid, record in records.items():
        row = next(line for line in lines if line.startswith(vid + " "))
        assert f" {record['status']} " in row and row.endswith(record["reason"] or "-")
    assert lines[-2].startswith(f"{len(records)} videos: {len(records) - 2} ok, 0 warning, "
                                "1 wrong, 1 fails")
    assert "1 annotated videos have no file in the folder: gone" in lines[-1]


def test_a_folder_that_extracts_right_exits_zero(folder, tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    for name in ("open_gop.mkv", "trimmed.mp4"):
        (good / name).write_bytes((folder / "videos" / name).read_bytes())
    result = run(good, "--fps", 15)
    assert result.exit_code == 0, result.output
    assert "2 videos: 2 ok, 0 warning, 0 wrong, 0 fails" in result.output


def test_the_probe_catches_a_reader_that_seeks(folder, monkeypatch):
    """With the old reader put back (decord for every protocol, frames fetched by index), the
    15 fps probe flags the open-GOP file."""
    def seeking(self, wanted, per_call):
        yield self._reader.get_batch(wanted).asnumpy()

    monkeypatch.setattr(decoding.VideoSource, "_read_decord", seeking)
    monkeypatch.setattr(SamplingProtocol, "uses_every_frame", property(lambda self: True))
    only = folder / "only"
    only.mkdir(exist_ok=True)
    (only / "open_gop.mkv").write_bytes((folder / "videos" / "open_gop.mkv").read_bytes())
    result = run(only, "--fps", 15)  # the default probe: 3 clips
    assert result.exit_code == 1
    row = result.output.splitlines()[1]
    assert " wrong " in row and "probed frames differ from a sequential decode" in row


def test_bad_input_is_one_line(tmp_path):
    result = run(tmp_path / "nowhere")
    assert result.exit_code == 2 and result.output.strip().endswith("video folder not found")
    tmp_path.joinpath("v").mkdir()
    result = run(tmp_path / "v", "--annotations", tmp_path / "gt.json")
    assert result.exit_code == 2 and "gt.json: annotation file not found" in result.output
