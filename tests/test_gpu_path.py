"""The GPU path's CPU-testable pieces: extraction's device pick and the backbone's precision.

No GPU is lent to this project; where CUDA itself is needed the CUDA calls are wrapped and
recorded, and bf16 runs on the CPU, which has the same rounding.
"""
from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F

from extract.backbone import VideoMAEv2
from extract.pipeline import pick_device, weight_dtype
from helpers.backbone import TINY, clips, random_state


def test_pick_device_makes_the_ranks_gpu_current(monkeypatch):
    """Without set_device the DataLoader's pin thread of every torchrun rank makes a CUDA
    context on GPU 0."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert pick_device("auto") == torch.device("cuda", 3)
    assert pick_device("cuda") == torch.device("cuda", 3)  # bare "cuda" is this rank's GPU
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    assert current == [torch.device("cuda", 3)] * 2 + [torch.device("cuda", 1)]
    assert pick_device("cpu") == torch.device("cpu") and len(current) == 3
    assert weight_dtype(torch.device("cuda", 0)) == torch.bfloat16
    assert weight_dtype(torch.device("cpu")) == torch.float32


def test_the_stored_feature_is_pooled_and_normed_in_float32_with_bf16_weights():
    model = VideoMAEv2(**dict(TINY, embed_dim=128, num_heads=4)).eval()
    model.load_state_dict(random_state(model))
    exact_model = VideoMAEv2(**dict(TINY, embed_dim=128, num_heads=4)).eval()
    exact_model.load_state_dict(model.state_dict())
    model = model.to(torch.bfloat16)  # what the Encoder does on CUDA
    x = clips(16, 32, 32, batch=4)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pooled, (tap,) = model.forward_taps(x, [2])
        exact = exact_model.forward_features(x)
    assert tap.dtype == torch.bfloat16 and pooled.dtype == torch.float32
    norm = model.fc_norm
    expected = F.layer_norm(tap.float().mean(1), norm.normalized_shape, norm.weight.float(),
                            norm.bias.float(), norm.eps)
    assert torch.equal(pooled, expected)  # the mean and the norm of the bf16 tokens, in fp32
    rounded = norm(tap.mean(1))  # the old order: a bf16 mean, then the norm
    error = lambda v: ((v.float() - exact).norm() / exact.norm()).item()  # noqa: E731
    assert error(pooled) < error(rounded)
    assert error(pooled) < 0.05


def test_workers_whose_chunks_dev_shm_cannot_hold_are_refused_in_one_line(tmp_path, monkeypatch):
    """Docker gives a container 64 MB of /dev/shm; the default 8 workers need about 3.2 GB."""
    from click.testing import CliRunner

    from cli import main
    from extract import pipeline
    from extract.config import ExtractionConfig
    from extract.pipeline import shared_memory_needed
    from helpers.extraction import TINY as TINY_BACKBONE
    from helpers.extraction import cli_args
    from helpers.videos import write_video

    thumos = ExtractionConfig(batch_size=32, num_workers=8)
    # 32 clips every 4 frames use 31 * 4 + 16 distinct frames of 3 x 224 x 224 float32; each
    # worker holds 4 chunks ahead and the one it fills.
    assert shared_memory_needed(thumos) == 8 * 5 * 140 * 3 * 224 * 224 * 4
    folder = tmp_path / "videos"
    folder.mkdir()
    write_video(folder / "a.mkv", 40)
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_BACKBONE))
    # The tiny protocol's chunks (32 px) need 4 MB; a 1 MB /dev/shm cannot hold them.
    monkeypatch.setattr(pipeline, "shared_memory_free", lambda: 2 ** 20)
    store = tmp_path / "out.zarr"
    result = CliRunner().invoke(main, cli_args(folder, store, tmp_path / "tiny.json",
                                               "--num-workers", "2"))
    assert result.exit_code == 2
    message = result.output.strip().splitlines()[-1]
    assert re.fullmatch(r"error: /dev/shm: 1 MB free, but 2 decoding workers can hold 4 MB of "
                        r"frames there; give it more \(docker run --shm-size=8g, or mount a "
                        r"larger tmpfs\) or lower --num-workers or --batch-size", message), message
    assert not store.exists()  # refused before anything was written
    # Two torchrun ranks on the node run two workers each: 8 MB, more than 6 MB.
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(pipeline, "shared_memory_free", lambda: 6 * 2 ** 20)
    result = CliRunner().invoke(main, cli_args(folder, store, tmp_path / "tiny.json",
                                               "--num-workers", "2"))
    assert result.exit_code == 2
    assert "6 MB free, but 2 processes x 2 decoding workers can hold 8 MB" in result.output
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr(pipeline, "shared_memory_free", lambda: 2 ** 40)
    assert CliRunner().invoke(main, cli_args(folder, store, tmp_path / "tiny.json",
                                             "--num-workers", "0")).exit_code == 0


def test_store_writes_run_on_the_writer_thread_and_a_failed_write_stops_the_run(tmp_path,
                                                                               monkeypatch):
    import threading

    from extract.pipeline import run_extraction
    from losa_tal import InputError
    from store import FeatureStore
    from store.writer import VideoWriter
    from helpers.extraction import settings_for, write_videos

    videos = write_videos(tmp_path / "videos")
    threads, real_write = [], VideoWriter.write

    def recording(self, start, features):
        threads.append(threading.current_thread().name)
        return real_write(self, start, features)

    monkeypatch.setattr(VideoWriter, "write", recording)
    summary = run_extraction(settings_for(videos, tmp_path / "ok.zarr", batch_size=3),
                             show_progress=False)
    assert len(summary.done) == 3 and len(threads) > 3
    assert set(threads) == {"store-writer_0"}  # the main thread only feeds the backbone

    def failing(self, start, features):
        if start > 0:
            raise InputError(f"{tmp_path / 'bad.zarr'}: no space left on device")
        return real_write(self, start, features)

    monkeypatch.setattr(VideoWriter, "write", failing)
    with pytest.raises(InputError, match="no space left on device"):
        run_extraction(settings_for(videos, tmp_path / "bad.zarr", batch_size=3),
                       show_progress=False)
    assert len(FeatureStore.open(tmp_path / "bad.zarr")) == 0  # nothing partial published
    assert not [t for t in threading.enumerate() if t.name.startswith("store-writer")]
