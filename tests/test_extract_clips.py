"""Decoding real video files into clips: exact frames, exact scaling, each frame decoded once."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from extract import clips, decoding
from extract.clips import (ClipChunks, backbone_frames, gather_clips, iter_chunks, make_loader,
                           open_video, scale_frames)
from helpers.videos import write_empty, write_random_bytes, write_truncated, write_video
from store.protocol import SamplingProtocol


def official_clip(frames: np.ndarray, start: int, size: int) -> torch.Tensor:
    """extract_tad_feature.py's transform of one clip, spelled out: [T,H,W,C] -> [C,T,S,S]."""
    clip = torch.from_numpy(frames[start:start + 16]).permute(3, 0, 1, 2).to(torch.float32) / 255
    return F.interpolate(clip, size=(size, size), mode="bilinear", align_corners=False)


def all_clips(path, protocol, clips_per_chunk):
    chunks = list(iter_chunks("v", path, protocol, clips_per_chunk))
    assert [c["first_clip"] for c in chunks] == list(range(0, chunks[0]["num_clips"],
                                                            clips_per_chunk))
    return torch.cat([gather_clips(c["frames"], c["index"]) for c in chunks]), chunks


# 32 px takes PyTorch's channels-last bilinear kernel, 72 px its generic one (see clips.py).
@pytest.mark.parametrize("clips_per_chunk, size", [(1, 32), (3, 72), (64, 32)])
def test_clips_equal_the_official_transform_bit_for_bit(tmp_path, clips_per_chunk, size):
    frames = write_video(tmp_path / "v.mkv", 41, height=36, width=52)
    protocol = SamplingProtocol(img_size=size)
    got, chunks = all_clips(tmp_path / "v.mkv", protocol, clips_per_chunk)
    starts = range(0, 41 - 15, 4)
    assert got.shape == (len(starts), 3, 16, size, size)
    for row, start in enumerate(starts):
        assert torch.equal(got[row], official_clip(frames, start, size))
    assert chunks[0]["info"] == {"num_frames": 41, "fps": 30.0, "duration": 41 / 30.0,
                                 "height": 36, "width": 52, "frame_rate": "constant",
                                 "decoder": {"name": "decord", "version": "0.6.0"}}


@pytest.mark.parametrize("normalise", ["none", "imagenet"])
def test_resize_on_device_sends_uint8_frames_and_gives_the_same_clips(tmp_path, normalise):
    """Workers send the decoded uint8 frames (a quarter of the float32 bytes at the same size);
    scaled in the main process on the CPU they give the official clips bit for bit."""
    frames = write_video(tmp_path / "v.mkv", 41, height=32, width=32)
    official = SamplingProtocol(img_size=32, normalise=normalise)
    on_device = SamplingProtocol(img_size=32, normalise=normalise, resize_on="device")
    sent = list(iter_chunks("v", tmp_path / "v.mkv", official, 3))
    raw = list(iter_chunks("v", tmp_path / "v.mkv", on_device, 3))
    for chunk, raw_chunk in zip(sent, raw, strict=True):
        assert raw_chunk["frames"].dtype == torch.uint8 and raw_chunk["frames"].shape[1:] == \
            (32, 32, 3)
        assert chunk["frames"].nbytes == 4 * raw_chunk["frames"].nbytes
        assert torch.equal(raw_chunk["index"], chunk["index"])
        assert torch.equal(backbone_frames(raw_chunk["frames"], on_device), chunk["frames"])
        assert torch.equal(backbone_frames(chunk["frames"], official), chunk["frames"])
    if normalise == "none":
        got = torch.cat([gather_clips(backbone_frames(c["frames"], on_device), c["index"])
                         for c in raw])
        for row, start in enumerate(range(0, 41 - 15, 4)):
            assert torch.equal(got[row], official_clip(frames, start, 32))


def test_each_frame_is_decoded_once(tmp_path, monkeypatch):
    write_video(tmp_path / "v.mkv", 60, height=24, width=32)
    decoded = []
    original = clips.decode_frames

    def counting(source, indices, protocol):
        decoded.extend(indices.tolist())
        return original(source, indices, protocol)

    monkeypatch.setattr(clips, "decode_frames", counting)
    got, _ = all_clips(tmp_path / "v.mkv", SamplingProtocol(img_size=16), clips_per_chunk=2)
    assert got.shape[0] == 12
    assert sorted(decoded) == list(range(60))  # 12 clips x 16 frames, yet 60 decodes


@pytest.mark.parametrize("size", [32, 72])
def test_three_frames_on_one_thread_are_scaled_like_the_official_clip(size):
    """Three planes on one thread is a special case of PyTorch's kernel choice (see clips.py)."""
    frames = np.random.default_rng(1).integers(0, 256, (16, 30, 40, 3), dtype=np.uint8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        scaled = scale_frames(torch.from_numpy(frames[:3]), SamplingProtocol(img_size=size))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(scaled.permute(1, 0, 2, 3), official_clip(frames, 0, size)[:, :3])


def test_short_video_is_one_clip_padded_with_its_last_frame(tmp_path):
    frames = write_video(tmp_path / "short.mkv", 5, height=24, width=32)
    got, chunks = all_clips(tmp_path / "short.mkv", SamplingProtocol(img_size=16), 4)
    assert got.shape == (1, 3, 16, 16, 16) and chunks[0]["num_clips"] == 1
    padded = np.concatenate([frames, np.repeat(frames[-1:], 11, axis=0)])
    assert torch.equal(got[0], official_clip(padded, 0, 16))


def test_short_side_crop_and_imagenet_normalisation(tmp_path):
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (16, 48, 64, 3),
                                                                 dtype=np.uint8))
    crop = scale_frames(frames, SamplingProtocol(img_size=32, resize="short_side_crop"))
    # short side 48 -> 32 makes the long side round(64 * 32 / 48) = 43; the crop keeps 5..36.
    full = F.interpolate(frames.permute(3, 0, 1, 2).float() / 255, size=(32, 43),
                         mode="bilinear", align_corners=False)
    assert torch.equal(crop, full[..., 5:37].permute(1, 0, 2, 3))
    norm = scale_frames(frames, SamplingProtocol(img_size=32, normalise="imagenet"))
    plain = scale_frames(frames, SamplingProtocol(img_size=32))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(norm, (plain - mean) / std, atol=1e-6)


def test_resampled_fps_uses_the_frames_on_screen(tmp_path):
    frames = write_video(tmp_path / "v.mkv", 40, height=24, width=32)
    protocol = SamplingProtocol(clip_len=4, clip_stride=2, fps=15.0, img_size=16)
    got, _ = all_clips(tmp_path / "v.mkv", protocol, 5)
    direct = scale_frames(torch.from_numpy(frames), protocol)
    for row in range(got.shape[0]):
        native = [2 * (2 * row + k) for k in range(4)]
        assert torch.equal(got[row], direct[native].permute(1, 0, 2, 3))


def test_lossy_and_oddly_timed_videos_decode(tmp_path):
    """H.264 at 29.97 fps, a variable-frame-rate file, an mkv named .avi, a one-frame video."""
    write_video(tmp_path / "ntsc.mp4", 33, fps=30000 / 1001)
    write_video(tmp_path / "vfr.mkv", 20, frame_times=np.cumsum([0] + [0.02, 0.05] * 10)[:20])
    write_video(tmp_path / "named.avi", 18, codec_ext=".mkv")
    write_video(tmp_path / "one.mp4", 1)
    expected = {"ntsc.mp4": (33, 30000 / 1001, 5), "vfr.mkv": (20, None, 2),
                "named.avi": (18, 30.0, 1), "one.mp4": (1, 30.0, 1)}
    for name, (num_frames, fps, num_clips) in expected.items():
        source = open_video(tmp_path / name)
        assert source.num_frames == num_frames, name
        if fps is not None:
            assert source.fps == pytest.approx(fps, rel=1e-6)
        got, _ = all_clips(tmp_path / name, SamplingProtocol(img_size=16), 8)
        assert got.shape == (num_clips, 3, 16, 16, 16) and torch.isfinite(got).all(), name


def test_frames_are_decoded_in_batches_of_bounded_size(tmp_path, monkeypatch):
    frames = write_video(tmp_path / "v.mkv", 17, height=60, width=80)
    monkeypatch.setattr(decoding, "MAX_DECODE_BYTES", 5 * 60 * 80 * 3)  # 5 frames at a time
    calls = []
    source = open_video(tmp_path / "v.mkv")
    original = source._reader.get_batch
    source._reader = type("Spy", (), {"get_batch": lambda self, ids: calls.append(ids)
                                      or original(ids)})()
    protocol = SamplingProtocol(img_size=72)
    scaled = clips.decode_frames(source, np.arange(17), protocol)
    assert [len(c) for c in calls] == [5, 5, 5, 2]
    assert torch.equal(scaled, scale_frames(torch.from_numpy(frames), protocol))


def test_a_4k_video_decodes(tmp_path):
    frames = write_video(tmp_path / "big.mp4", 2, height=2160, width=3840)
    got, chunks = all_clips(tmp_path / "big.mp4", SamplingProtocol(img_size=72), 4)
    assert got.shape == (1, 3, 16, 72, 72) and chunks[0]["info"]["width"] == 3840


def test_broken_files_become_failed_items_and_the_rest_goes_on(tmp_path):
    write_video(tmp_path / "good.mp4", 20, seed=1)
    write_video(tmp_path / "source.mp4", 40)
    write_random_bytes(tmp_path / "noise.mp4")
    write_empty(tmp_path / "empty.mkv")
    write_truncated(tmp_path / "cut.mp4", tmp_path / "source.mp4")
    write_video(tmp_path / "zero.mp4", 0)
    (tmp_path / "text.avi").write_text("not a video")
    videos = [(p.stem, p) for p in sorted(tmp_path.iterdir()) if p.stem != "source"]
    items = list(ClipChunks(videos, SamplingProtocol(img_size=16), clips_per_chunk=8))
    failed = {i["video"]: i["error"] for i in items if i["kind"] == "failed"}
    assert sorted(failed) == ["cut", "empty", "noise", "text", "zero"]
    assert failed["noise"].startswith("noise.mp4: ")
    good = [i for i in items if i["kind"] == "chunk"]
    assert [i["video"] for i in good] == ["good"] and good[0]["num_clips"] == 2


def test_workers_split_videos_and_keep_each_video_in_order(tmp_path):
    for seed, n in enumerate([30, 44, 20, 52]):
        write_video(tmp_path / f"v{seed}.mkv", n, height=24, width=32, seed=seed)
    videos = [(f"v{i}", tmp_path / f"v{i}.mkv") for i in range(4)]
    dataset = ClipChunks(videos, SamplingProtocol(img_size=16), clips_per_chunk=2)
    seen = {}
    for item in make_loader(dataset, num_workers=2, pin_memory=False):
        seen.setdefault(item["video"], []).append(item["first_clip"])
    assert seen == {"v0": [0, 2], "v1": [0, 2, 4, 6], "v2": [0], "v3": [0, 2, 4, 6, 8]}
