"""``python cli.py visualize``: one video's timeline, with thumbnails decoded from a real file."""
import av
import numpy as np
import pytest
from click.testing import CliRunner

import cli
from evaluation import evaluate_detections, load_annotations, load_predictions, plot_timeline
from evaluation.timeline import match_one_video, read_thumbnails
from helpers.evaluation_inputs import gt_dict, preds_dict, write_json
from losa_tal import InputError

FPS, SECONDS = 10, 4


def write_ramp_video(path):
    """An H.264 file whose red channel grows with time, so decoded frames reveal their time."""
    container = av.open(str(path), "w")
    stream = container.add_stream("libx264", rate=FPS)
    stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    for i in range(FPS * SECONDS):
        frame = np.zeros((48, 64, 3), np.uint8)
        frame[..., 0] = 5 + 6 * i
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return str(path)


GT = gt_dict({"v1": [(0.5, 1.5, "Jump"), (2.0, 3.5, "Run"), (2.2, 3.0, "Jump")]}, duration=4.0)
PREDS = preds_dict({"v1": [(0.6, 1.4, "Jump", 0.9), (0.5, 1.5, "Jump", 0.8),
                           (2.0, 3.4, "Run", 0.7), (3.0, 3.9, "Run", 0.3),
                           (2.0, 3.4, "Jump", 0.5)]})


def test_true_positives_are_those_of_the_evaluation():
    rng = np.random.default_rng(3)
    truth = {f"v{i}": [(s, s + rng.uniform(1, 5), str(rng.choice(["a", "b"])))
                       for s in rng.uniform(0, 30, 8)] for i in range(3)}
    found = {vid: [(s, s + rng.uniform(0.5, 5), str(rng.choice(["a", "b"])), float(x))
                   for s, x in zip(rng.uniform(0, 30, 40), rng.choice([0.3, 0.6, 0.9], 40))]
             for vid in truth}
    ann, preds = load_annotations(gt_dict(truth)), load_predictions(preds_dict(found))
    evaluation = evaluate_detections(ann, preds, tiou_thresholds=[0.5])
    hit_rows = set(evaluation.detections.rows[evaluation.matched[0] >= 0].tolist())
    for vid in truth:
        rows = np.flatnonzero(preds.video_index == preds.video_ids.index(vid))
        is_tp = match_one_video(ann.video(vid), preds.for_video(vid), 0.5)
        assert is_tp.tolist() == [row in hit_rows for row in rows]


def test_hand_case_colours():
    video = load_annotations(GT).video("v1")
    is_tp = match_one_video(video, load_predictions(PREDS).for_video("v1"), 0.5)
    assert is_tp.tolist() == [True, False, True, False, True]


def test_thumbnails_come_from_the_right_times(tmp_path):
    times, frames = read_thumbnails(write_ramp_video(tmp_path / "v.mp4"), 8)
    assert frames.shape == (8, 48, 64, 3) and frames.dtype == np.uint8
    np.testing.assert_allclose(times, (np.arange(8) + 0.5) * SECONDS / 8, atol=1 / FPS)
    red = frames[..., 0].mean(axis=(1, 2))
    np.testing.assert_allclose(red, 5 + 6 * times * FPS - 3, atol=8)  # frame i: red 5 + 6 i


def test_visualize_command_with_and_without_the_video(tmp_path):
    gt, preds = write_json(tmp_path / "gt.json", GT), write_json(tmp_path / "p.json", PREDS)
    video = write_ramp_video(tmp_path / "v.mp4")
    sizes = {}
    for name, extra in (("plain", []), ("thumbs", ["--video-file", video])):
        out = tmp_path / f"{name}.png"
        result = CliRunner().invoke(cli.main, ["visualize", "--annotations", gt, "--preds", preds,
                                               "--video", "v1", "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
        assert out.read_bytes().startswith(b"\x89PNG")
        sizes[name] = out.stat().st_size
    assert sizes["thumbs"] > sizes["plain"] > 10_000


def test_visualize_without_ground_truth_draws_detections_and_old_gt_flag_still_works(tmp_path):
    gt, preds = write_json(tmp_path / "gt.json", GT), write_json(tmp_path / "p.json", PREDS)
    result = CliRunner().invoke(cli.main, ["visualize", "--preds", preds, "--video", "v1",
                                           "--out", str(tmp_path / "bare.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "bare.png").read_bytes().startswith(b"\x89PNG")
    result = CliRunner().invoke(cli.main, ["visualize", "--gt", gt, "--preds", preds, "--video",
                                           "v1", "--out", str(tmp_path / "old.png")])
    assert result.exit_code == 0, result.output
    assert result.stderr == "note: --gt is now --annotations\n"


def test_timeline_api_for_a_video_without_detections(tmp_path):
    out = plot_timeline(GT, {"results": {}}, "v1", tmp_path / "t.png", top=3)
    assert out == str(tmp_path / "t.png") and (tmp_path / "t.png").stat().st_size > 5000


@pytest.mark.parametrize("problem", ["unknown video", "not a video", "missing file", "bad tiou"])
def test_visualize_bad_input_is_one_line(problem, tmp_path):
    gt, preds = write_json(tmp_path / "gt.json", GT), write_json(tmp_path / "p.json", PREDS)
    args = ["visualize", "--annotations", gt, "--preds", preds, "--video", "v1", "--out",
            str(tmp_path / "o.png")]
    fake = tmp_path / "fake.mp4"
    fake.write_text("not a video")
    args, expected = {
        "unknown video": (args[:6] + ["v9"] + args[7:], f"{gt}: no video 'v9'"),
        "not a video": (args + ["--video-file", str(fake)], f"{fake}: cannot decode the video"),
        "missing file": (args + ["--video-file", str(tmp_path / "no.mp4")],
                         f"{tmp_path / 'no.mp4'}: no such file"),
        "bad tiou": (args + ["--tiou", "0"], "--tiou: threshold 0.0 is outside (0, 1]"),
    }[problem]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: {expected}") and result.stderr.count("\n") == 1
    assert not (tmp_path / "o.png").exists()


def test_read_thumbnails_raises_input_error_for_garbage(tmp_path):
    (tmp_path / "x.mp4").write_bytes(b"\x00" * 1000)
    with pytest.raises(InputError, match="cannot decode the video"):
        read_thumbnails(str(tmp_path / "x.mp4"), 4)
