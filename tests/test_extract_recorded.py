"""A store remembers how it was extracted: appending takes every setting from it, a flag that
contradicts it is refused before any model is built, ``--like`` copies another store's settings,
and a backbone file's geometry is not replaced by a flag's default. Real videos, the tiny
random-init backbone, real Zarr stores, through the real command line."""
import json
import os
import subprocess
import sys
import time

import pytest

from extract import pipeline
from helpers import REPO
from helpers.extraction import (SIZE, TINY, assert_same_contents, cli_args, run_cli,
                                store_contents, write_videos)
from store import FeatureStore


@pytest.fixture
def first_store(tmp_path):
    """A store of two videos made with every setting given, and a folder of one new video."""
    write_videos(tmp_path / "videos", {"a.mp4": (40, 30), "b.mp4": (36, 25)})
    write_videos(tmp_path / "new", {"c.mp4": (44, 30)})
    backbone = tmp_path / "tiny.json"
    backbone.write_text(json.dumps(TINY))
    store = tmp_path / "store.zarr"
    result = run_cli(*cli_args(tmp_path / "videos", store, backbone, "--seed", "3",
                               "--fps", "15"))
    assert result.exit_code == 0, result.output
    return store


def test_appending_with_no_flags_takes_every_setting_from_the_store(first_store, tmp_path):
    before = store_contents(first_store)
    result = run_cli("extract", "--videos", tmp_path / "new", "--out", first_store,
                     "--num-workers", "0", "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    after = store_contents(first_store)
    assert set(after) == {"a", "b", "c"}
    assert_same_contents({vid: after[vid] for vid in before}, before)  # bit for bit
    # The new video is what a fresh store with the original flags holds.
    alone = tmp_path / "alone.zarr"
    result = run_cli(*cli_args(tmp_path / "new", alone, tmp_path / "tiny.json", "--seed", "3",
                               "--fps", "15"))
    assert result.exit_code == 0, result.output
    assert_same_contents({"c": after["c"]}, store_contents(alone))


def test_a_contradicting_flag_is_refused_before_any_backbone_is_built(first_store, tmp_path,
                                                                      monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("a backbone was built")

    monkeypatch.setattr(pipeline, "Encoder", never)
    before = store_contents(first_store)
    started = time.perf_counter()
    result = run_cli("extract", "--videos", tmp_path / "new", "--out", first_store,
                     "--img-size", "64", "--layers", "1", "--seed", "4", "--quiet")
    seconds = time.perf_counter() - started
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    message = result.stderr
    assert message.startswith(f"error: {first_store}: was extracted with other settings: ")
    for field in (f"protocol.img_size ({first_store}: {SIZE}, --img-size: 64)",
                  f"layers ({first_store}: [1, 2], --layers: [1])",
                  f"seed ({first_store}: 3, --seed: 4)"):
        assert field in message, message
    assert seconds < 1.0, seconds
    assert store_contents(first_store).keys() == before.keys()
    # In a fresh process: refused without importing torch.
    code = ("import sys\nimport cli\n"
            f"sys.argv = ['cli.py', 'extract', '--videos', {str(tmp_path / 'new')!r}, '--out', "
            f"{str(first_store)!r}, '--img-size', '64']\n"
            "try:\n    cli.main()\nexcept SystemExit as stop:\n    print(stop.code)\n"
            "print('torch' in sys.modules)\n")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=60, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert child.stdout.split() == ["2", "False"], child
    assert "protocol.img_size" in child.stderr
    # A store made with random weights takes no checkpoint.
    checkpoint = tmp_path / "weights.pth"
    checkpoint.write_bytes(b"not read")
    result = run_cli("extract", "--videos", tmp_path / "new", "--out", first_store,
                     "--checkpoint", checkpoint)
    assert result.exit_code == 2 and f"checkpoint ({first_store}: random weights, " \
        f"--checkpoint: weights.pth)" in result.stderr, result.output


@pytest.mark.slow
def test_like_copies_a_stores_settings_and_flags_still_win(first_store, tmp_path):
    other = tmp_path / "other.zarr"
    result = run_cli("extract", "--videos", tmp_path / "new", "--out", other, "--like",
                     first_store, "--layers", "2", "--num-workers", "0", "--device", "cpu",
                     "--quiet")
    assert result.exit_code == 0, result.output
    made, model = FeatureStore.open(other).meta, FeatureStore.open(first_store).meta
    assert made["layers"] == [2] and model["layers"] == [1, 2]
    for key in ("backbone", "protocol", "tokens"):
        assert made[key] == model[key], key


def test_a_backbone_files_image_size_is_kept_unless_a_flag_gives_one(tmp_path):
    write_videos(tmp_path / "videos", {"a.mp4": (20, 30)})
    backbone = tmp_path / "small.json"
    backbone.write_text(json.dumps({**TINY, "img_size": 48}))
    args = ["extract", "--videos", tmp_path / "videos", "--backbone", backbone, "--random-init",
            "--num-workers", "0", "--device", "cpu", "--quiet"]
    result = run_cli(*args, "--out", tmp_path / "kept.zarr")
    assert result.exit_code == 0, result.output
    assert FeatureStore.open(tmp_path / "kept.zarr").meta["protocol"]["img_size"] == 48
    result = run_cli(*args, "--out", tmp_path / "both.zarr", "--img-size", "32")
    assert result.exit_code == 2 and result.stderr.startswith(
        f"error: --img-size: protocol img_size: 32 but the backbone's img_size is 48 "
        f"({backbone}); give one"), result.stderr


@pytest.mark.slow
def test_the_synth_preset_makes_the_demos_store(tmp_path):
    from synth.demo import DemoSettings, extract_benchmark
    from synth.generator import SynthConfig, generate

    benchmark = tmp_path / "benchmark"
    config = SynthConfig(videos=2, min_seconds=8, max_seconds=10)
    generate(str(benchmark), config, progress=False)
    extract_benchmark(benchmark, tmp_path / "demo.zarr", DemoSettings(synth=config,
                                                                      progress=False))
    result = run_cli("extract", "--preset", "synth", "--videos", benchmark / "videos",
                     "--annotations", benchmark / "annotations.json", "--out",
                     tmp_path / "cli.zarr", "--quiet")
    assert result.exit_code == 0, result.output
    assert_same_contents(store_contents(tmp_path / "cli.zarr"),
                         store_contents(tmp_path / "demo.zarr"))
