"""``run_extraction`` and ``python cli.py extract`` end to end: real videos written by the tests,
decoded by decord, encoded by a tiny random-init VideoMAEv2, written to real Zarr and HDF5 stores.

The reference every test compares with is computed here independently: frames decoded with decord
directly, the official per-clip transform, ``model.forward_features`` and ``forward_intermediates``
pooled with ``torch.nn.functional.adaptive_avg_pool3d``.

Reliability cases (for the campaign's totals; see also test_extract_faults.py):
hostile inputs 2 (corrupt video through the CLI with workers, overflowing fp16 features),
determinism 2 (Zarr equals HDF5; the CLI with 2 workers equals the in-process run),
crashes 0, disk/permissions 0, concurrency 0.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from extract.backbone import build_backbone
from extract.pipeline import run_extraction
from helpers import REPO
from helpers.evaluation_inputs import ACTIONFORMER_FILE, needs_thumos
from helpers.extraction import (LAYERS, SIZE, TINY, TOKENS, VIDEOS, assert_same_contents,
                                cli_args, run_cli, settings_for, store_contents, write_videos)
from helpers.videos import write_random_bytes, write_video
from losa_tal import InputError
from store import LAST, FeatureStore
from store.protocol import SamplingProtocol


def reference_features(path, seed=0, checkpoint_state=None) -> dict:
    """What the store must hold for one video, computed the plain way."""
    import decord

    torch.manual_seed(seed)
    model = build_backbone({**TINY, "img_size": SIZE, "all_frames": 16}).eval()
    if checkpoint_state is not None:
        model.load_state_dict(checkpoint_state)
    reader = decord.VideoReader(str(path))
    frames = torch.from_numpy(reader.get_batch(list(range(len(reader)))).asnumpy())
    starts = list(range(0, len(frames) - 15, 4)) or [0]
    padded = torch.cat([frames, frames[-1:].expand(16, *frames.shape[1:])])
    clips = torch.stack([
        F.interpolate(padded[s:s + 16].permute(3, 0, 1, 2).float() / 255, size=(SIZE, SIZE),
                      mode="bilinear", align_corners=False) for s in starts])
    grid = model.token_grid_for(16, SIZE, SIZE)
    with torch.inference_mode():
        expected = {LAST: model.forward_features(clips)}
        for layer, tokens in zip(LAYERS, model.forward_intermediates(clips, LAYERS)):
            volume = tokens.transpose(1, 2).reshape(len(clips), -1, *grid)
            expected[layer] = F.adaptive_avg_pool3d(volume, TOKENS).flatten(2).transpose(1, 2)
    return {layer: values.numpy() for layer, values in expected.items()}


def as_float16(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).astype(np.float32)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    return write_videos(tmp_path_factory.mktemp("videos"))


@pytest.fixture(scope="module")
def zarr_store(videos, tmp_path_factory):
    path = tmp_path_factory.mktemp("stores") / "features.zarr"
    summary = run_extraction(settings_for(videos, path), show_progress=False)
    assert sorted(summary.done) == ["a", "b", "c"] and not summary.failed  # longest first
    return path


# -- what is stored ----------------------------------------------------------------------------
def test_layers_equal_the_backbone_on_the_same_clips(videos, zarr_store):
    fs = FeatureStore.open(zarr_store)
    assert fs.videos() == ["a", "b", "c"]
    for vid, path in videos:
        expected = reference_features(path)
        got = fs.read(vid)
        assert sorted(got, key=str) == sorted([LAST, *LAYERS], key=str)
        assert got[LAST].shape == (len(expected[LAST]), TINY["embed_dim"])
        assert got[1].shape == (len(expected[LAST]), 4, TINY["embed_dim"])
        for layer, values in expected.items():
            # fp16 storage of the very same float32 numbers: equal after rounding, bit for bit.
            assert np.array_equal(got[layer], as_float16(values)), (vid, layer)


def test_feature_times_and_video_info_are_stored_per_video(zarr_store):
    fs = FeatureStore.open(zarr_store)
    for vid, (frames, fps) in ((Path(n).stem, spec) for n, spec in VIDEOS.items()):
        info = fs.video_info(vid)
        starts = np.arange(len(range(0, frames - 15, 4)) or 1) * 4
        assert info["num_clips"] == len(starts) and info["num_frames"] == frames
        assert info["fps"] == pytest.approx(fps) and info["float32_layers"] == []
        # What the features were computed on and in (a GPU run records its card and bfloat16).
        assert (info["compute_device"], info["compute_dtype"]) == ("cpu", "float32")
        assert np.allclose(fs.feature_times(vid), (starts + 8) / fps, rtol=0, atol=1e-12)


def test_metadata_records_backbone_protocol_and_layout(zarr_store):
    meta = FeatureStore.open(zarr_store).meta
    assert meta["backbone"]["checkpoint"] is None and meta["backbone"]["random_init_seed"] == 0
    assert {k: meta["backbone"]["kwargs"][k] for k in TINY} == TINY
    assert meta["backbone"]["kwargs"]["img_size"] == SIZE
    assert SamplingProtocol.from_dict(meta["protocol"]) == SamplingProtocol(img_size=SIZE)
    assert (meta["layers"], meta["tokens"], meta["feature_dim"], meta["dtype"]) == \
        (LAYERS, list(TOKENS), TINY["embed_dim"], "float16")


def test_resize_on_device_stores_the_same_features_on_the_cpu(videos, zarr_store, tmp_path):
    """Frames sent as uint8 and resized in the main process (with a worker, as in a real run):
    on the CPU the features equal the official worker-resize store bit for bit; the protocol
    records the choice, and the default stays unrecorded (older stores stay appendable)."""
    path = tmp_path / "device.zarr"
    protocol = SamplingProtocol(img_size=SIZE, resize_on="device")
    run_extraction(settings_for(videos, path, protocol=protocol, num_workers=1),
                   show_progress=False)
    assert_same_contents(store_contents(path), store_contents(zarr_store))
    assert FeatureStore.open(path).meta["protocol"]["resize_on"] == "device"
    assert "resize_on" not in FeatureStore.open(zarr_store).meta["protocol"]


def test_hdf5_store_holds_the_same_values(videos, zarr_store, tmp_path):
    path = tmp_path / "features.h5"
    run_extraction(settings_for(videos, path), show_progress=False)
    assert FeatureStore.open(path).format == "hdf5"
    assert_same_contents(store_contents(path), store_contents(zarr_store))


def test_overflowing_layer_is_stored_in_float32_never_inf(videos, tmp_path):
    torch.manual_seed(0)
    model = build_backbone({**TINY, "img_size": SIZE, "all_frames": 16})
    state = model.state_dict()
    state["fc_norm.weight"] = state["fc_norm.weight"] * 1e6  # last layer far beyond fp16
    checkpoint = tmp_path / "loud.pth"
    torch.save(state, checkpoint)
    path = tmp_path / "loud.zarr"
    with pytest.warns(UserWarning, match="beyond the float16 range"):
        run_extraction(settings_for(videos[:1], path, checkpoint=str(checkpoint)),
                       show_progress=False)
    fs = FeatureStore.open(path)
    expected = reference_features(videos[0][1], checkpoint_state=state)
    got = fs.read("a")
    assert fs.video_info("a")["float32_layers"] == [LAST]
    assert np.abs(expected[LAST]).max() > 65504 and np.array_equal(got[LAST], expected[LAST])
    assert np.array_equal(got[1], as_float16(expected[1]))  # the other layers stay fp16
    assert fs.meta["backbone"]["checkpoint"]["file"] == "loud.pth"
    assert fs.meta["backbone"]["random_init_seed"] is None


# -- resuming and appending --------------------------------------------------------------------
def test_rerun_skips_finished_videos_and_appends_new_ones(videos, zarr_store, tmp_path):
    path = tmp_path / "grow.zarr"
    first = run_extraction(settings_for(videos[:1], path), show_progress=False)
    assert first.done == ["a"]
    new_video = tmp_path / "d.mkv"
    write_video(new_video, 24, seed=7)
    second = run_extraction(settings_for([*videos, ("d", str(new_video))], path),
                            show_progress=False)
    assert (sorted(second.done), second.already, second.failed) == (["b", "c", "d"], ["a"], {})
    third = run_extraction(settings_for(videos, path), show_progress=False)
    assert (third.done, sorted(third.already), third.clips) == ([], ["a", "b", "c"], 0)
    contents = store_contents(path)
    assert_same_contents({v: contents[v] for v in "abc"}, store_contents(zarr_store))
    assert np.array_equal(contents["d"][2][LAST], as_float16(reference_features(new_video)[LAST]))


@pytest.mark.parametrize("change, key", [
    ({"layers": [1, 3]}, "layers"),
    ({"tokens": (1, 1, 1)}, "tokens"),
    ({"protocol": SamplingProtocol(img_size=SIZE, clip_stride=8)}, "protocol.clip_stride"),
    ({"protocol": SamplingProtocol(img_size=SIZE, resize_on="device")}, "protocol.resize_on"),
    ({"backbone": {**TINY, "depth": 3}}, "backbone.kwargs.depth"),
    ({"seed": 1}, "backbone.random_init_seed"),
])
def test_append_with_another_backbone_protocol_or_layout_is_refused(videos, zarr_store, tmp_path,
                                                                   change, key):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(zarr_store, copy)
    with pytest.raises(InputError, match=rf"was written with a different .*{key} \(store: "):
        run_extraction(settings_for(videos, copy, **change), show_progress=False)
    assert_same_contents(store_contents(copy), store_contents(zarr_store))


def test_features_of_another_dtype_are_refused_before_the_backbone_is_built(videos, zarr_store,
                                                                            tmp_path,
                                                                            monkeypatch):
    """A store a GPU run began (bf16) takes no fp32 features from a CPU run: one store, one
    kind of feature. The refusal comes before the backbone is built."""
    from extract import pipeline

    source = FeatureStore.open(zarr_store)
    gpu_store = tmp_path / "gpu.zarr"
    with FeatureStore.create(gpu_store, source.meta) as store:
        store.write_video("a", source.read("a"), source.feature_times("a"),
                          {"compute_device": "cuda (NVIDIA H100 80GB HBM3)",
                           "compute_dtype": "bfloat16"})
    built = []
    real_build = pipeline.build_backbone
    monkeypatch.setattr(pipeline, "build_backbone", lambda *a, **k: built.append(1)
                        or real_build(*a, **k))
    with pytest.raises(InputError) as refusal:
        run_extraction(settings_for(videos, gpu_store), show_progress=False)
    assert str(refusal.value) == (
        f"{gpu_store}: holds features computed in bfloat16 on cuda (NVIDIA H100 80GB HBM3); "
        "this run would compute them in float32 on cpu: extract on the same kind of device "
        "(`device`), or into another store")
    assert built == [] and FeatureStore.open(gpu_store).videos() == ["a"]


# -- the command line --------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_with_workers_skips_a_corrupt_video_and_equals_the_in_process_run(
        videos, zarr_store, tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    for _, path in videos:
        shutil.copy2(path, folder)  # the store records each file's size, time and hash
    write_random_bytes(folder / "broken.mp4")
    backbone = tmp_path / "tiny.json"
    backbone.write_text(json.dumps(TINY))
    store = tmp_path / "cli.zarr"
    # Two decoding workers and another batch size: the stored values must not change.
    args = cli_args(folder, store, backbone, "--num-workers", 2, "--batch-size", 3)
    result = subprocess.run([sys.executable, "cli.py", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "extracted 3 videos" in result.stdout and "1 failed" in result.stdout
    assert "  failed: broken.mp4: cannot open" in result.stdout
    assert_same_contents(store_contents(store), store_contents(zarr_store))


@needs_thumos
def test_cli_annotations_choose_the_videos_and_name_the_missing_ones(tmp_path):
    """The real THUMOS-14 file: only its test videos are taken, the others are listed missing."""
    write_videos(tmp_path / "videos", {"video_test_0000004.mkv": (20, 30),
                                       "video_validation_0000051.mkv": (20, 30),
                                       "holiday.mkv": (20, 30)})
    backbone = tmp_path / "tiny.json"
    backbone.write_text(json.dumps(TINY))
    store = tmp_path / "thumos.zarr"
    args = cli_args(tmp_path / "videos", store, backbone, "--annotations", ACTIONFORMER_FILE)
    result = run_cli(*args, "--subset", "Test")
    assert result.exit_code == 0, result.output
    assert "extracted 1 videos" in result.stdout
    assert "extracting on cpu (" in result.stderr  # the device really used, never silent
    assert "211 annotated videos have no file in the folder: video_test_0000006, " \
        in result.stdout
    # Our stand-in is 20 frames long; the real video is not: reported, like a truncated file.
    assert re.search(r"warning: video 'video_test_0000004' decodes to 0.67 s but the "
                     r"annotations say \d+\.\d\d s \(a truncated file\?\)", result.stdout)
    assert FeatureStore.open(store).videos() == ["video_test_0000004"]
    result = run_cli(*args, "--subset", "testing")  # no such subset: refused, not empty
    assert result.exit_code == 2 and "testing" in result.stderr and "Test" in result.stderr
    result = run_cli(*args)  # every subset
    assert result.exit_code == 0 and "extracted 1 videos" in result.stdout
    assert FeatureStore.open(store).videos() == ["video_test_0000004", "video_validation_0000051"]


def test_cli_bad_options_are_one_line_errors(videos, tmp_path):
    folder = Path(videos[0][1]).parent
    backbone = tmp_path / "tiny.json"
    backbone.write_text(json.dumps(TINY))
    cases = {
        ("--layers", "1,x"): "--layers: expected block indices",
        ("--layers", "9"): "9",
        ("--tokens", "9x1x1"): "--tokens: grid 9x1x1 is finer than the backbone's token grid",
        ("--clip-stride", "0"): "protocol clip_stride: must be a positive integer",
    }
    for extra, message in cases.items():
        result = run_cli(*cli_args(folder, tmp_path / "x.zarr", backbone), *extra)
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
        assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    result = run_cli("extract", "--videos", folder, "--out", tmp_path / "x.zarr",
                     "--backbone", "vit_s")
    assert result.exit_code == 2 and "--random-init" in result.stderr
    assert not (tmp_path / "x.zarr").exists()


def test_set_and_presets_reach_every_key_and_errors_say_where_the_value_came_from(
        videos, tmp_path, monkeypatch):
    """Flags win over --set, --set over the preset (whose replaced values are not looked at);
    a bad value is one line naming its flag, --set, or the preset file and key, also when only
    running the backbone finds it bad."""
    from extract import commands

    folder = Path(videos[0][1]).parent
    backbone = tmp_path / "tiny.json"
    backbone.write_text(json.dumps(TINY))
    monkeypatch.setattr(commands, "PRESET_DIR", tmp_path)
    (tmp_path / "mine.json").write_text(json.dumps({"protocol": {"clip_stride": 0, "fps": 15},
                                                    "layers": [9]}))
    base = ["extract", "--videos", folder, "--backbone", backbone, "--random-init",
            "--img-size", SIZE, "--num-workers", 0, "--device", "cpu", "--quiet"]
    cases = {
        ("--set", "protocol.clip_stride=0"): "--set: protocol.clip_stride: must be a positive "
                                             "integer, got 0",
        ("--set", "protocol.stride=3"): "--set: protocol.stride: unknown key",
        ("--set", "tokens=[9, 1, 1]", "--layers", "1"): "--set: tokens: grid 9x1x1 is finer "
                                                       "than the backbone's",
        ("--preset", "mine"): f"{tmp_path / 'mine.json'}: protocol.clip_stride: must be a "
                              "positive integer, got 0",
        # the flag decides the stride, the preset still the layers
        ("--preset", "mine", "--clip-stride", "4"): f"{tmp_path / 'mine.json'}: layers: block 9 "
                                                    "does not exist",
    }
    for extra, message in cases.items():
        result = run_cli(*base, "--out", tmp_path / "x.zarr", *extra)
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
        assert result.stderr.startswith(f"error: {message}"), result.stderr
    assert not (tmp_path / "x.zarr").exists()
    store = tmp_path / "set.zarr"
    result = run_cli(*base, "--out", store, "--preset", "mine", "--layers", "1",
                     "--set", "protocol.clip_stride=2", "--clip-stride", "4",
                     "--set", "protocol.fps=10")
    assert result.exit_code == 0, result.output
    meta = FeatureStore.open(store).meta
    protocol = meta["protocol"]
    # --clip-stride over --set over the preset; --set over the preset; the flags over both.
    assert (protocol["clip_stride"], protocol["fps"], protocol["img_size"]) == (4, 10, SIZE)
    assert meta["layers"] == [1] and protocol["tail"] == "drop"  # a default stays


def test_a_bad_setting_is_refused_without_importing_torch(tmp_path):
    """The extract command checks its settings before it imports the pipeline."""
    code = ("import sys\n"
            "from click.testing import CliRunner\n"
            "import cli\n"
            f"args = ['extract', '--videos', {str(tmp_path)!r}, '--out', 'x.zarr', '--random-init',"
            " '--set', 'protocol.clip_strde=3']\n"
            "result = CliRunner().invoke(cli.main, args)\n"
            "print(result.exit_code, result.output.strip())\n"
            "print('torch' in sys.modules)\n")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=60, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = child.stdout.splitlines()
    assert lines[0].startswith("2 error: --set: protocol.clip_strde: unknown key"), child
    assert lines[1:] == ["False"], child.stdout


def test_presets_say_what_to_download_and_where(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli("extract", "--preset", "thumos")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: checkpoints/vit_g_hybrid_pt_1200e_k710_ft.pth: "
                                    "checkpoint not found; download ")
    result = run_cli("extract", "--preset", "thumos", "--random-init")
    assert result.exit_code == 2 and result.stderr.startswith(
        "error: data/thumos14/videos: video folder not found; put the THUMOS-14 ")
    result = run_cli("extract", "--preset", "anet", "--random-init", "--videos", tmp_path)
    assert result.exit_code == 2 and result.stderr.startswith(
        "error: data/anet/annotations/activity_net.v1-3.min.json: annotation file not found; "
        "put the ActivityNet-1.3 annotations ")


@pytest.mark.parametrize("dataset", ["thumos", "anet"])
def test_presets_write_where_the_training_configs_read(dataset):
    from extract.config import load_preset
    from training.config import load_config

    # Both through their typed loaders (which check every key), so defaults count as written.
    preset = vars(load_preset(dataset))
    trains = [vars(data) for data in (load_config(p).data for p in
                                      (REPO / "configs" / "train").glob("*.json"))
              if data.dataset == dataset]
    assert trains and all(t["store"] == preset["store"] for t in trains)
    assert all(t["annotations"] == preset["annotations"] for t in trains)
