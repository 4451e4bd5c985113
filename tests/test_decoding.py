"""Frame-accurate decoding (extract/decoding.py): every clip holds exactly the frames the
protocol names, whatever the encoding, the frame rate and the sampling.

Each video is written with PyAV with its frame index drawn into the pixels
(tests/helpers/indexed_videos.py); the clip reader's output is read back to indices and compared
with the protocol's own list.
"""
import json
import os

import numpy as np
import pytest
import torch

from extract.clips import gather_clips, iter_chunks
from extract.decoding import open_video
from helpers.indexed_videos import (ENCODINGS, EXTENSIONS, can_encode, decode_all, read_index,
                                    write_cut_before_keyframe, write_indexed, write_trimmed)
from helpers.processes import scheduling
from helpers.videos import write_video
from store import LAST, FeatureStore
from store.protocol import SamplingProtocol
from synth.videos import encode

NTSC = 30000 / 1001
FRAMES = 150  # 5 s at 30 fps: five GOPs of 30
LOSSY = ["h264_open_gop", "mpeg4_bframes", "hevc_default", "vp9", "av1"]
RESAMPLED = SamplingProtocol(fps=15.0, img_size=32)  # the ActivityNet preset's rate
SPREAD = SamplingProtocol(frame_interval=2, clip_stride=8, img_size=32)  # skips native frames


def native_fps(encoding):
    return NTSC if encoding == "h264_open_gop" else 30


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """{encoding: path} of the indexed test videos this FFmpeg can write."""
    folder = tmp_path_factory.mktemp("encoded")
    return {name: write_indexed(folder / f"{name}{EXTENSIONS[ENCODINGS[name][0]]}", FRAMES,
                                name, fps=native_fps(name))
            for name in LOSSY if can_encode(name)}


def clip_indices(path, protocol, clips_per_chunk=4):
    """What the clip reader returns, as frame indices [num_clips, clip_len], and the chunks."""
    chunks = list(iter_chunks("v", path, protocol, clips_per_chunk))
    clips = torch.cat([gather_clips(c["frames"], c["index"]) for c in chunks])
    indices = [[read_index(clip[:, t]) for t in range(clip.shape[1])] for clip in clips]
    return np.array(indices), chunks


@pytest.mark.parametrize("protocol", [RESAMPLED, SPREAD], ids=["fps15", "interval2"])
@pytest.mark.parametrize("encoding", LOSSY)
def test_clips_hold_the_named_frames_when_frames_are_skipped(encoded, encoding, protocol):
    if encoding not in encoded:
        pytest.skip(f"this FFmpeg cannot encode {encoding}")
    got, chunks = clip_indices(encoded[encoding], protocol)
    expected = protocol.native_indices(FRAMES, native_fps(encoding))
    assert got.shape == expected.shape
    assert np.array_equal(got, expected), f"{(got != expected).sum()} frames wrong"
    # A protocol that skips frames is read by PyAV, which converts only the frames used.
    assert chunks[0]["info"]["decoder"]["name"] == "pyav"


@pytest.mark.skipif(not hasattr(os, "sched_getscheduler"), reason="Linux scheduling only")
def test_encoding_leaves_the_scheduling_of_the_process_as_it_was(tmp_path):
    """SVT-AV1's encoder, run as root, put the test process under SCHED_FIFO at priority 99;
    every command a later test started inherited it, and two spinning children of such
    commands kept them off both CPUs (a CI run hung on it)."""
    if not can_encode("av1"):
        pytest.skip("this FFmpeg cannot encode av1")
    before = scheduling()
    write_indexed(tmp_path / "av1.mkv", 30, "av1")
    assert scheduling() == before


def test_the_open_gop_files_do_defeat_index_seeking(encoded):
    """The fixture is a real trap: decord's own seeks return other frames on these files."""
    import decord

    for encoding in ("h264_open_gop", "mpeg4_bframes"):
        reader = decord.VideoReader(str(encoded[encoding]), num_threads=1)
        wanted = np.unique(RESAMPLED.native_indices(FRAMES, native_fps(encoding)))
        seeked = [read_index(f) for f in reader.get_batch(wanted.tolist()).asnumpy()]
        assert (np.array(seeked) != wanted).sum() > 10, encoding


def test_a_protocol_that_reads_backwards_rewinds_instead_of_seeking(encoded):
    # Clip k holds frames k and k + 3: the second chunk starts before the first one ended.
    protocol = SamplingProtocol(clip_len=2, frame_interval=3, clip_stride=1, img_size=32)
    got, _ = clip_indices(encoded["mpeg4_bframes"], protocol, clips_per_chunk=1)
    assert np.array_equal(got, protocol.native_indices(FRAMES, 30))


def test_frames_an_edit_list_hides_are_not_counted_or_returned(tmp_path):
    source = write_indexed(tmp_path / "full.mp4", 90, "h264_closed_gop")
    trimmed = write_trimmed(tmp_path / "trimmed.mp4", source, cut=15)  # keyframes at 0, 30, 60
    import decord

    assert len(decord.VideoReader(str(trimmed))) == 90  # what the old reader counted
    video = open_video(trimmed)
    assert (video.decoder, video.num_frames) == ("pyav", 75)
    assert video.info["duration"] == pytest.approx(2.5)
    protocol = SamplingProtocol(img_size=32)
    got, _ = clip_indices(trimmed, protocol)
    assert np.array_equal(got, 15 + protocol.native_indices(75, 30))  # the last clip ends at 89


def test_frames_that_cannot_be_decoded_after_a_cut_are_not_counted(tmp_path):
    source = write_indexed(tmp_path / "full.mp4", 90, "h264_closed_gop")  # keyframes 0, 30, 60
    cut = write_cut_before_keyframe(tmp_path / "cut.mkv", source, drop=15)
    import decord

    assert len(decord.VideoReader(str(cut))) == 75  # 15 of them never decode
    video = open_video(cut)
    assert (video.decoder, video.num_frames, video.info["frame_rate"]) == ("pyav", 60, "constant")
    protocol = SamplingProtocol(img_size=32)
    got, _ = clip_indices(cut, protocol)
    assert np.array_equal(got, 30 + protocol.native_indices(60, 30))


def test_a_width_decord_cannot_copy_is_read_by_pyav(tmp_path):
    frames = write_video(tmp_path / "w72.mkv", 20, height=36, width=72)  # lossless
    video = open_video(tmp_path / "w72.mkv")
    assert video.decoder == "pyav"
    assert np.array_equal(np.concatenate(list(video.read(np.arange(20)))), frames)


# Frames alternately 20, 50 and 30 ms apart: 30 fps on average, never evenly spaced.
VFR_TIMES = np.cumsum([0.0] + [0.02, 0.05, 0.03] * 20)[:60]


@pytest.mark.parametrize("encoding, ext", [("ffv1_lossless", ".mkv"), ("vp9", ".webm")])
def test_variable_frame_rate_uses_the_frames_own_times(tmp_path, encoding, ext):
    if not can_encode(encoding):
        pytest.skip(f"this FFmpeg cannot encode {encoding}")
    path = write_indexed(tmp_path / f"vfr{ext}", 60, encoding, frame_times=VFR_TIMES)
    video = open_video(path)
    assert video.decoder == "pyav" and video.info["frame_rate"] == "variable"
    duration = VFR_TIMES[-1] * 60 / 59
    assert video.info["duration"] == pytest.approx(duration, abs=1e-3)
    # Resampled: frame k is the one on screen at k / 15 s.
    protocol = SamplingProtocol(clip_len=4, clip_stride=4, fps=15.0, img_size=32)
    got, chunks = clip_indices(path, protocol)
    instants = np.arange(got.size) / 15
    on_screen = np.searchsorted(VFR_TIMES, instants + 1e-6, side="right") - 1
    assert np.array_equal(got.ravel(), on_screen)
    assert np.allclose(chunks[0]["times"], (np.arange(len(got)) * 4 + 2) / 15)
    # Native rate: every frame once; a feature's time is when its clip-centre frame shows.
    native = SamplingProtocol(clip_len=4, clip_stride=4, img_size=32)
    got, chunks = clip_indices(path, native)
    assert np.array_equal(got.ravel(), np.arange(60))
    assert np.allclose(chunks[0]["times"], VFR_TIMES[np.arange(15) * 4 + 2], atol=1e-3)


@pytest.mark.parametrize("rate", [[], ["--fps", 15]], ids=["native", "fps15"])
def test_an_open_gop_file_and_its_lossless_twin_give_the_same_features(encoded, tmp_path,
                                                                         rate):
    """The acceptance check (issue 15), through ``cli.py extract`` at 15 fps (PyAV reads all)
    and at the native rate (decord reads all but AV1): the same pixels give the same features
    whatever the encoding and the decoder; AV1 extracts too."""
    from helpers.extraction import TINY, cli_args, run_cli

    folder = tmp_path / "videos"
    folder.mkdir()
    pairs = {}
    for encoding in ("h264_open_gop", "av1"):
        if encoding not in encoded:
            continue
        coded = folder / f"{encoding}{encoded[encoding].suffix}"
        coded.write_bytes(encoded[encoding].read_bytes())
        twin = write_indexed(folder / f"{encoding}_twin.mkv", FRAMES, "ffv1_lossless",
                             fps=native_fps(encoding), images=decode_all(coded))
        pairs[coded.stem] = twin.stem
    backbone = tmp_path / "tiny.json"
    backbone.write_text(json.dumps(TINY))
    store = tmp_path / "s.zarr"
    result = run_cli(*cli_args(folder, store, backbone, *rate))
    assert result.exit_code == 0, result.output
    fs = FeatureStore.open(store)
    assert sorted(fs.videos()) == sorted([*pairs, *pairs.values()])
    assert "sequential" in fs.meta["protocol"]["decoding"]
    for coded, twin in pairs.items():
        assert np.array_equal(fs.feature_times(coded), fs.feature_times(twin))
        features, twin_features = fs.read(coded), fs.read(twin)
        assert sorted(features, key=str) == sorted([LAST, *fs.layers], key=str)
        for layer, values in features.items():
            assert np.array_equal(values, twin_features[layer]), (coded, layer)
        native_decoder = "pyav" if coded == "av1" else "decord"
        assert fs.video_info(coded)["decoder"]["name"] == (native_decoder if not rate else "pyav")
        assert fs.video_info(twin)["decoder"]["name"] == ("decord" if not rate else "pyav")
        assert fs.video_info(coded)["num_frames"] == FRAMES


@pytest.mark.parametrize("pix_fmt, codec, form", [
    ("yuv420p", "libx264", "mp4"), ("yuv444p", "libx264", "mp4"), ("yuvj420p", "libx264", "mp4"),
    ("yuv420p", "mpeg4", "avi")])
def test_decord_and_pyav_give_the_same_rgb_on_8_bit_video(tmp_path, pix_fmt, codec, form):
    """Why the decoder choice cannot change features: on the same 8-bit stream the two
    decoders' frames are equal bit for bit (noise, so chroma interpolation would show)."""
    frames = np.random.default_rng(0).integers(0, 256, (12, 90, 160, 3), dtype=np.uint8)
    path = tmp_path / f"noise.{form}"
    encode(path, frames, form, codec, pix_fmt, {})
    by_decord = open_video(path)
    assert by_decord.decoder == "decord"
    by_pyav = open_video(path, every_frame=False)
    assert by_pyav.decoder == "pyav"
    assert np.array_equal(np.concatenate(list(by_decord.read(np.arange(12)))),
                          np.concatenate(list(by_pyav.read(np.arange(12)))))
