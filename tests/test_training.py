"""Stage-two training and inference on small synthetic feature stores written through the store API.

The stores hold random features with an injected signal: during each annotated action the
last-layer features (and, through them, the intermediate tokens) move along a direction of the
action's class, so a detector can learn the segments from a handful of videos in seconds.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from evaluation import evaluate_map, load_annotations
from helpers import REPO
from helpers.evaluation_inputs import ACTIONFORMER_FILE, needs_thumos
from helpers.training import (CLASSES, DIM, LAYERS, TOKENS, assert_same_state, final_weights,
                              make_dataset, synthetic_videos, tiny_config, write_annotations,
                              write_config, write_store)
import losa_tal
from losa_tal import InputError
from store import FeatureStore
from training import checkpoint as ckpt
from training.data import (StoreDataset, collate, seconds_to_steps, steps_to_seconds,
                           to_video_steps, video_truth)
from training.infer import infer
from training.train import train

# One thread, as in this process (tests/conftest.py): runs stay bitwise comparable across processes.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


# ---------------------------------------------------------------------------------------------
# Ground truth on the feature grid.

def test_seconds_map_onto_steps_through_recorded_times():
    times = (np.arange(50) * 4 + 8) / 25.0  # clip centres at 25 fps, stride 4
    steps = seconds_to_steps([times[0], times[10], (times[20] + times[21]) / 2, 0.0, 9.0], times)
    np.testing.assert_allclose(steps[:3], [0, 10, 20.5])
    # Beyond the recorded centres the grid extends linearly.
    np.testing.assert_allclose(steps[3:], [-2.0, (9.0 * 25 - 8) / 4])
    np.testing.assert_allclose(steps_to_seconds(steps, times), [times[0], times[10],
                                                                (times[20] + times[21]) / 2,
                                                                0.0, 9.0])


def test_identical_segments_keep_every_label_and_unknown_labels_are_dropped():
    ann = load_annotations({"database": {"v": {"subset": "training", "duration": 10.0,
                                               "annotations": [
                                                   {"segment": [1.0, 2.0], "label": "Run"},
                                                   {"segment": [1.0, 2.0], "label": "Jump"},
                                                   {"segment": [3.0, 4.0], "label": "Swim"},
                                                   {"segment": [50.0, 60.0], "label": "Run"}]}}})
    times = (np.arange(60) * 4 + 8) / 30.0
    truth = video_truth(ann.videos("training")["v"], times, {"Jump": 0, "Run": 1})
    # Swim is not a class of the model; the segment beyond the features is dropped.
    assert truth.labels.tolist() == [1, 0]
    np.testing.assert_allclose(truth.segments[0], truth.segments[1])
    np.testing.assert_allclose(truth.segments[0], seconds_to_steps([1.0, 2.0], times))


@needs_thumos
def test_real_thumos_ground_truth_reaches_the_head_as_multi_label_targets(tmp_path):
    """THUMOS-14 marks some dives as both Diving and CliffDiving: one point, two labels."""
    from head import ActionFormerHead

    thumos = ACTIONFORMER_FILE
    vid, fps, duration = "video_validation_0000161", 30.0, 61.83
    num_clips = (round(duration * fps) - 16) // 4 + 1
    times = (np.arange(num_clips) * 4 + 8) / fps
    store_path = write_store(tmp_path / "thumos.zarr", {vid: {
        "times": times, "last": np.random.default_rng(0).normal(size=(num_clips, 8))}}, dim=8)
    annotations = load_annotations(thumos)
    config = tiny_config(data={"max_seq_len": 2304, "crop_ratio": None})  # the whole video
    with pytest.warns(UserWarning, match="199 of 200 'Validation' videos in .* not in the store"):
        dataset = StoreDataset(FeatureStore.open(store_path), annotations, "Validation",
                               annotations.classes, [], config.data, train=True)
    sample = dataset[0]
    truth = annotations.videos("Validation")[vid]
    assert len(sample["segments"]) == len(truth.labels) == 8
    # 11.3 s is clip centre (11.3 * 30 - 8) / 4 = 82.75 on this video's grid.
    assert sample["segments"][0, 0].item() == pytest.approx((11.3 * fps - 8) / 4, abs=1e-4)
    head = ActionFormerHead(8, len(annotations.classes), embed_dim=16, num_heads=2)
    batch = collate([sample])
    cls_targets, _ = head.assign(head(batch["last"], batch["mask"]), batch["targets"])
    both = [annotations.classes.index(c) for c in ("CliffDiving", "Diving")]
    assert (cls_targets[0][:, both].sum(-1) == 2).any()


# ---------------------------------------------------------------------------------------------
# Samples: windows, resizing, layers read.

def test_training_windows_keep_actions_inside_and_read_only_what_is_needed(dataset_files):
    dataset = make_dataset(*dataset_files, max_seq_len=32, min_action_inside=0.5)
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            sample = dataset[index]
            layers, start, stop = dataset.store.reads[-1]
            assert layers == ("last", *LAYERS) and stop - start == 32
            assert sample["last"].shape == (32, DIM)
            assert sample["inter"].shape == (len(LAYERS), 32, 2, DIM)
            # Every action of the window is kept when at least half of it is inside; at
            # least one is (the videos have an action every 24 steps).
            segments = sample["segments"].numpy()
            assert len(segments) >= 1
            assert (segments >= 0).all() and (segments <= 32).all()   # ActionFormer's [0, L]
            truth = dataset.truth[sample["video"]].segments
            inside = np.minimum(truth[:, 1], stop) - np.maximum(truth[:, 0], start)
            expected = (inside >= 0.5 * (truth[:, 1] - truth[:, 0]) - 1e-9).sum()
            assert len(segments) == expected
    # The same (seed, epoch, index) gives the same window; another epoch moves it.
    dataset.set_epoch(1)
    a = dataset[0]["step_offset"]
    dataset.set_epoch(1)
    assert dataset[0]["step_offset"] == a
    assert len({(dataset.set_epoch(e), dataset[0]["step_offset"])[1] for e in range(8)}) > 1

    head_only = make_dataset(*dataset_files, layers=(), crop_ratio=None)
    sample = head_only[0]
    assert head_only.store.reads == [(("last",), 0, 96)] and sample["inter"] is None


def test_inference_windows_cover_the_video_and_map_back(dataset_files):
    dataset = make_dataset(*dataset_files, train=False, infer_window=40, infer_overlap=0.25)
    pieces = [p for p in dataset.pieces if p[0] == dataset.videos[0]]
    assert [(start, stop) for _, start, stop in pieces] == [(0, 40), (30, 70), (56, 96)]
    sample = dataset[2]
    assert sample["step_offset"] == 56
    np.testing.assert_allclose(to_video_steps([0.0, 39.0], sample), [56.0, 95.0])


def test_resize_mode_resamples_whole_videos_and_scales_segments(dataset_files):
    dataset = make_dataset(*dataset_files, mode="resize", resize_len=48)
    sample = dataset[0]
    truth = dataset.truth[sample["video"]]
    assert sample["last"].shape == (48, DIM) and sample["inter"].shape == (2, 48, 2, DIM)
    assert sample["step_scale"] == 0.5
    np.testing.assert_allclose(to_video_steps(sample["segments"].numpy(), sample),
                               truth.segments, rtol=1e-5, atol=1e-4)
    batch = collate([dataset[0], dataset[1]])
    assert batch["mask"].all() and batch["inter"].shape == (2, 2, 48, 2, DIM)


# ---------------------------------------------------------------------------------------------
# Training, inference, evaluation.

@pytest.mark.slow
def test_losa_overfits_a_few_videos_and_infer_writes_what_evaluate_reads(dataset_files, tmp_path):
    store_path, annotations_path = dataset_files
    # 40 epochs: these intermediate layers are pure noise, which the zero-projection fusion
    # lets in early, so the head needs longer than the 25 that zero gates needed (docs/losa.md).
    config = tiny_config(train={"epochs": 40}, eval={"subset": "training", "every": 40},
                         model={"losa": {"dropout": 0.0}}, head={"drop_path": 0.0})
    summary = train(config, store_path, annotations_path, tmp_path / "run", progress=False)
    assert summary["best"]["epoch"] == 40
    assert summary["best"]["average_map"] >= 0.9

    checkpoint = final_weights(tmp_path / "run")
    assert checkpoint["ema"]["losa.fuse.weight"].abs().max() > 0  # the adapters took part
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert sum(r["event"] == "step" for r in log) == 80 and log[-1]["event"] == "epoch"

    out = tmp_path / "preds.json"
    result = CliRunner().invoke(cli_main(), [
        "infer", "--run", str(tmp_path / "run"), "--store", str(store_path), "--annotations",
        str(annotations_path), "--subset", "training", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    predictions = json.loads(out.read_text())
    first = predictions["results"]["video_000"][0]
    assert first["label"] in CLASSES and 0 <= first["segment"][0] < first["segment"][1] <= 13
    report = evaluate_map(load_annotations(annotations_path), predictions, subset="training")
    assert report["average_mAP"] == pytest.approx(summary["best"]["average_map"], abs=1e-9)


def test_standardise_centres_features_and_travels_in_the_checkpoint_to_infer(tmp_path):
    """data.standardise on features that are a large constant plus a small variation (as a
    random-weight ViT gives): zero mean, unit std on the training videos; the statistics are
    checkpoint buffers that infer uses; LoSA at initialisation feeds the head what head-only
    does."""
    from training.config import Config
    from training.data import channel_statistics
    from training.detector import Detector
    from training.infer import build_trained_detector, predict

    videos = {**synthetic_videos(4, "training"), **synthetic_videos(2, "validation", first=4)}
    offset = np.random.default_rng(5).normal(size=DIM) * 100.0
    for video in videos.values():
        video["last"] = (video["last"] * 0.05 + offset).astype(np.float32)
    store_path = write_store(tmp_path / "offset.zarr", videos)
    annotations_path = write_annotations(tmp_path / "gt.json", videos)
    config = tiny_config(data={"standardise": True}, train={"epochs": 2})
    train(config, store_path, annotations_path, tmp_path / "run", progress=False)

    # The training videos, standardised by the trained model's buffers.
    state = ckpt.load(tmp_path / "run" / "last.pt")  # weights_only=True inside
    store = FeatureStore.open(store_path)
    model = build_trained_detector(state, Config.from_dict(state["config"]), store, "last.pt")
    training_set = StoreDataset(store, load_annotations(annotations_path), "training",
                                CLASSES, list(LAYERS), config.data, train=False)
    batch = collate([training_set[i] for i in range(len(training_set))])
    last, inter = model.standardised_inputs(batch)
    valid = batch["mask"]
    assert last[valid].mean(0).abs().max() < 1e-3
    assert (last[valid].std(0, unbiased=False) - 1).abs().max() < 1e-3
    for layer in range(len(LAYERS)):
        tokens = inter[:, layer][valid].reshape(-1, DIM)
        assert tokens.mean(0).abs().max() < 1e-3
        assert (tokens.std(0, unbiased=False) - 1).abs().max() < 1e-3
    raw_std = batch["last"][valid].std(0)
    assert raw_std.max() < 0.2 and batch["last"][valid].mean(0).abs().max() > 50  # it mattered

    # The buffers are the training videos' statistics, and infer (from the checkpoint) predicts
    # what an in-memory model with freshly computed statistics and the same weights predicts.
    fresh = Detector(DIM, len(CLASSES), len(LAYERS), int(np.prod(TOKENS)), config.model,
                     config.head, standardise=True)
    fresh.set_standardisation(**channel_statistics(store, training_set.videos, list(LAYERS)))
    for name in ("last_mean", "last_std", "inter_mean", "inter_std"):
        assert torch.allclose(state["ema"][name], getattr(fresh, name), rtol=1e-5), name
    weights = {k: v for k, v in state["ema"].items() if not k.endswith(("_mean", "_std"))}
    fresh.load_state_dict(weights, strict=False)
    validation = StoreDataset(store, load_annotations(annotations_path), "validation",
                              CLASSES, list(LAYERS), config.data, train=False)
    in_memory = predict(fresh, validation, config.postprocess, "cpu", CLASSES)
    from_checkpoint = infer(tmp_path / "run", store_path, annotations_path, subset="validation")
    assert from_checkpoint["results"] == in_memory["results"]
    assert sum(map(len, in_memory["results"].values())) > 0

    # LoSA at initialisation (zero fusion projection) hands the head exactly the head-only
    # model's standardised input, and at the same seed it is the same head: LoSA starts as the
    # head-only model of its seed, whichever adapters it builds.
    head_inputs, heads = {}, {}
    for kind in ("losa", "head_only"):
        kind_config = tiny_config(data={"standardise": True}, model={"type": kind})
        torch.manual_seed(7)
        detector = Detector(DIM, len(CLASSES), len(LAYERS) if kind == "losa" else 0,
                            int(np.prod(TOKENS)), kind_config.model, kind_config.head,
                            standardise=True).eval()
        detector.set_standardisation(**channel_statistics(store, training_set.videos,
                                                          list(LAYERS) if kind == "losa" else []))
        detector.head.register_forward_hook(
            lambda module, args, output, kind=kind: head_inputs.setdefault(kind, args[0]))
        detector({**batch, "inter": batch["inter"] if kind == "losa" else None})
        heads[kind] = detector.head.state_dict()
    assert torch.equal(head_inputs["losa"], head_inputs["head_only"])
    assert_same_state(heads["losa"], heads["head_only"])
    assert head_inputs["losa"][valid].abs().mean() > 0.5  # standardised, not the raw constant


def test_same_seed_same_weights_other_seed_other_weights(dataset_files, tmp_path):
    store_path, annotations_path = dataset_files
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        config = tiny_config(train={"epochs": 2, "seed": seed})
        train(config, store_path, annotations_path, tmp_path / name, progress=False)
        runs[name] = final_weights(tmp_path / name)
    assert_same_state(runs["a"]["model"], runs["b"]["model"])
    assert_same_state(runs["a"]["ema"], runs["b"]["ema"])
    assert not torch.equal(runs["a"]["model"]["head.cls_tower.predict.conv.weight"],
                           runs["c"]["model"]["head.cls_tower.predict.conv.weight"])


def test_an_evaluation_failure_loses_no_finished_epoch(dataset_files, tmp_path, monkeypatch):
    # The last epoch's evaluation runs out of memory (a long video did so with a dense
    # attention): the epoch is already saved, and the failure is one line, not a traceback.
    import training.infer

    store_path, annotations_path = dataset_files
    run, real_predict, saved_epochs = tmp_path / "run", training.infer.predict, []

    def predict_running_out_of_memory(*args, **kwargs):
        saved_epochs.append(ckpt.load(run / "last.pt")["epoch"])
        if len(saved_epochs) == 2:
            raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate "
                               "123480309760 bytes.\nException raised from alloc_cpu")
        return real_predict(*args, **kwargs)

    monkeypatch.setattr(training.infer, "predict", predict_running_out_of_memory)
    config = tiny_config(train={"epochs": 2}, eval={"every": 1, "subset": "training"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = train(config, store_path, annotations_path, run, progress=False)
    assert saved_epochs == [1, 2]  # each epoch was on disk before its evaluation began
    (failure,) = [str(w.message) for w in caught if "evaluation failed" in str(w.message)]
    assert failure == ("epoch 2: evaluation failed (RuntimeError: DefaultCPUAllocator: not "
                       "enough memory: you tried to allocate 123480309760 bytes.); the epoch "
                       f"is kept in {run / 'last.pt'}")
    assert ckpt.load(run / "last.pt")["epoch"] == 2
    assert summary["best"]["epoch"] == ckpt.load(run / "best.pt")["epoch"] == 1
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [(r["event"], r["epoch"]) for r in log if r["event"].startswith("eval")] == [
        ("eval", 1), ("eval_failed", 2)]
    assert "average_map" not in [r for r in log if r["event"] == "epoch"][-1]


def test_head_only_reads_a_store_without_intermediate_layers(tmp_path):
    videos = {**synthetic_videos(2, "training"), **synthetic_videos(1, "validation", first=2)}
    store_path = write_store(tmp_path / "last_only.zarr", videos, layers=())
    annotations_path = write_annotations(tmp_path / "gt.json", videos)
    with pytest.raises(InputError, match="holds no intermediate layers, which LoSA needs"):
        train(tiny_config(), store_path, annotations_path, tmp_path / "losa", progress=False)
    summary = train(tiny_config(model={"type": "head_only"}, train={"epochs": 1}), store_path,
                    annotations_path, tmp_path / "head_only", progress=False)
    assert summary["epoch"] == 1 and summary["best"] is not None


def test_a_checkpoint_saved_with_the_old_config_keys_still_infers_the_same(tmp_path):
    """Checkpoints hold their config as plain data; one written before the keys took the
    public API's names (eval.nms, eval.pre_nms_topk, head.regression_bounds, ...) loads
    through training.config.RENAMED and predicts what the renamed config predicts."""
    videos = {**synthetic_videos(2, "training"), **synthetic_videos(1, "validation", first=2)}
    store_path = write_store(tmp_path / "store.zarr", videos)
    annotations_path = write_annotations(tmp_path / "gt.json", videos)
    config = tiny_config(train={"epochs": 1}, postprocess={"nms_method": "hard",
                                                           "iou_threshold": 0.3})
    train(config, store_path, annotations_path, tmp_path / "run", progress=False)
    state = ckpt.load(tmp_path / "run" / "last.pt")
    old = json.loads(json.dumps(state["config"]))
    post, head = old.pop("postprocess"), old["head"]
    del old["description"]
    assert head.pop("regression_ranges") == [[0, 4], [4, 8], [8, None]]
    head["regression_bounds"] = [0, 4, 8]
    old["eval"].update(score_threshold=post["score_threshold"], pre_nms_topk=post["pre_nms_top_k"],
                       min_duration=post["min_duration"], max_segments=post["max_segments"],
                       nms=post["nms_method"], nms_sigma=post["sigma"],
                       iou_threshold=post["iou_threshold"], voting_iou=post["voting_iou"])
    ckpt.save(tmp_path / "old.pt", {**state, "config": old})
    renamed = infer(tmp_path / "run" / "last.pt", store_path, annotations_path, "validation")
    assert infer(tmp_path / "old.pt", store_path, annotations_path, "validation") == renamed
    assert sum(map(len, renamed["results"].values())) > 0


# ---------------------------------------------------------------------------------------------
# Refusals: the wrong store, the wrong checkpoint, a run directory in use.

def cli_main():
    sys.path.insert(0, str(REPO))
    import cli

    return cli.main


def run_cli(args):
    result = CliRunner().invoke(cli_main(), args)
    return result.exit_code, result.output.strip()


def test_the_model_flag_trains_the_losa_recipe_as_the_head_only_baseline(tmp_path):
    """``--model head_only`` (``make train MODEL=head_only``) replaces a head-only recipe."""
    videos = {**synthetic_videos(2, "training"), **synthetic_videos(1, "validation", first=2)}
    store_path = write_store(tmp_path / "last_only.zarr", videos, layers=())
    config_path = write_config(tmp_path / "losa.json", tiny_config(train={"epochs": 1}))
    args = ["train", "--config", str(config_path), "--store", str(store_path), "--annotations",
            str(write_annotations(tmp_path / "gt.json", videos)), "--quiet"]
    code, output = run_cli([*args, "--out", str(tmp_path / "losa")])
    assert code == 2 and "holds no intermediate layers, which LoSA needs" in output
    code, output = run_cli([*args, "--out", str(tmp_path / "head_only"), "--model", "head_only"])
    assert code == 0 and output.startswith("trained 1 epochs"), output
    saved = json.loads((tmp_path / "head_only" / "config.json").read_text())
    assert saved["model"]["type"] == "head_only"


def test_missing_store_says_to_extract_first(tmp_path):
    code, output = run_cli(["train", "--config", str(REPO / "configs/train/thumos_vitg_losa.json"),
                            "--store", str(tmp_path / "nowhere.zarr"),
                            "--out", str(tmp_path / "run")])
    assert code == 2
    assert output == (f"error: {tmp_path / 'nowhere.zarr'}: feature store not found; make it "
                      "with `losa-tal extract --preset thumos` first (or pass --store)")
    # The suggested command exists: the preset is found (and says what it misses).
    code, output = run_cli(["extract", "--preset", "thumos", "--random-init"])
    assert code == 2 and "video folder not found; put the THUMOS-14" in output, output


def test_a_run_remembers_its_inputs_and_infer_run_alone_uses_them(dataset_files, tmp_path,
                                                                   monkeypatch):
    """train --store --annotations records both (as given, and absolute); infer --run alone
    reads them from another working directory; --store still overrides them."""
    store_path, annotations_path = dataset_files
    work = tmp_path / "work"
    work.mkdir()
    (work / "data").mkdir()
    (work / "data" / "store.zarr").symlink_to(store_path)
    (work / "data" / "gt.json").symlink_to(annotations_path)
    config_path = write_config(tmp_path / "tiny.json", tiny_config(train={"epochs": 1}))
    monkeypatch.chdir(work)
    code, output = run_cli(["train", "--config", str(config_path), "--store", "data/store.zarr",
                            "--annotations", "data/gt.json", "--out", "run", "--quiet"])
    assert code == 0, output
    saved = json.loads((work / "run" / "config.json").read_text())["data"]
    assert (saved["store"], saved["annotations"]) == ("data/store.zarr", "data/gt.json")
    start = json.loads((work / "run" / "log.jsonl").read_text().splitlines()[0])
    from training.train import default_cpu_threads

    assert start["torch_threads"] == default_cpu_threads()  # CPU training's default
    assert start["inputs"]["store"] == {"given": "data/store.zarr",
                                        "absolute": str(work / "data" / "store.zarr")}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, output = run_cli(["infer", "--run", str(work / "run"), "--out", "preds.json",
                            "--quiet"])
    assert code == 0 and "; predicted on cpu (" in output, output  # the device used, said
    predictions = json.loads((elsewhere / "preds.json").read_text())["results"]
    assert set(predictions) == {"video_004", "video_005"}
    code, output = run_cli(["infer", "--run", str(work / "run"), "--store", "nowhere.zarr",
                            "--out", "preds.json", "--quiet"])
    assert code == 2 and output.startswith("error: nowhere.zarr: feature store not found"), output


@pytest.mark.parametrize("overrides, problem", [
    (["model.layers=[1, 5]"], "lacks intermediate layers [5] that the config needs"),
    (["model.tokens=[1, 2, 2]"], "holds a pooled token grid [1, 1, 2], the config needs [1, 2, 2]"),
])
def test_store_lacking_layers_or_tokens_is_refused_before_training(dataset_files, tmp_path,
                                                                   overrides, problem):
    store_path, annotations_path = dataset_files
    config_path = write_config(tmp_path / "config.json", tiny_config())
    code, output = run_cli(["train", "--config", str(config_path), "--store", str(store_path),
                            "--annotations", str(annotations_path), "--out",
                            str(tmp_path / "run"), *sum((["--set", o] for o in overrides), [])])
    assert code == 2 and output.startswith(f"error: {store_path}: {problem}")
    assert "\n" not in output and not (tmp_path / "run").exists()


def test_videos_missing_from_the_store_are_warned_about_once(dataset_files, tmp_path):
    store_path, annotations_path = dataset_files
    data = json.loads(Path(annotations_path).read_text())
    for name in ("video_900", "video_901"):
        data["database"][name] = {**data["database"]["video_000"]}
    bigger = tmp_path / "bigger.json"
    bigger.write_text(json.dumps(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_dataset(store_path, bigger)
    messages = [str(w.message) for w in caught if "not in the store" in str(w.message)]
    assert messages == [f"{store_path}: 2 of 6 'training' videos in {bigger} are not in the "
                        "store; skipping them"]


def test_wrong_checkpoints_and_stores_are_one_line_errors(dataset_files, tmp_path, monkeypatch):
    store_path, annotations_path = dataset_files
    config = tiny_config(train={"epochs": 1})
    train(config, store_path, annotations_path, tmp_path / "run", progress=False)
    checkpoint = tmp_path / "run" / "last.pt"
    infer_args = ["infer", "--store", str(store_path), "--annotations", str(annotations_path),
                  "--out", str(tmp_path / "p.json"), "--quiet"]

    # A store of another width (another backbone) than the checkpoint was trained on.
    videos = synthetic_videos(2, "validation", first=4)
    other = write_store(tmp_path / "other.zarr", videos, dim=8)
    code, output = run_cli([*infer_args[:1], "--checkpoint", str(checkpoint), "--store",
                            str(other), *infer_args[3:]])
    assert code == 2 and output.startswith(f"error: {other}: its features differ from those the "
                                           f"checkpoint {checkpoint} was trained on: ")
    assert "backbone.kwargs.embed_dim (store: 8, checkpoint: 16)" in output
    assert "feature_dim (store: 8, checkpoint: 16)" in output

    # Weights that do not fit the config, a pickled payload, and a file that is not ours.
    state = torch.load(checkpoint, weights_only=True)
    state["ema"]["head.cls_tower.predict.conv.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad_shape.pt")
    torch.save({"format": "losa-tal-checkpoint", "payload": object()}, tmp_path / "pickled.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    for name, problem in (("bad_shape.pt", "weights do not fit the model its config describes"),
                          ("pickled.pt", "not a loadable checkpoint"),
                          ("foreign.pt", "not a LoSA-TAL training checkpoint")):
        code, output = run_cli([*infer_args[:1], "--checkpoint", str(tmp_path / name),
                                *infer_args[1:]])
        assert code == 2 and output.startswith(f"error: {tmp_path / name}: {problem}"), output
        assert "\n" not in output

    # A full disk while writing a checkpoint: one line, and the previous checkpoint survives.
    before = checkpoint.read_bytes()
    # The temporary file it writes is /dev/full in disguise.
    monkeypatch.setattr(losa_tal.tempfile, "mkstemp", lambda dir, prefix: (
        os.open("/dev/full", os.O_WRONLY), os.path.join(dir, prefix + "full")))
    with pytest.raises(InputError, match=re.escape(
            f"{checkpoint}: cannot write the checkpoint (the previous one is intact): "
            "no space left on the device")):
        ckpt.save(checkpoint, {"epoch": 9})
    monkeypatch.undo()
    assert checkpoint.read_bytes() == before and not list(checkpoint.parent.glob(".tmp-*"))

    # The run directory is in use; resuming with changed settings is refused.
    config_path = write_config(tmp_path / "config.json", config)
    train_args = ["train", "--config", str(config_path), "--store", str(store_path),
                  "--annotations", str(annotations_path), "--out", str(tmp_path / "run"),
                  "--quiet"]
    code, output = run_cli(train_args)
    assert code == 2 and "already holds a training run (last.pt); pass --resume" in output
    code, output = run_cli([*train_args, "--resume", "--set", "optim.lr_head=1e-2"])
    assert code == 2 and output == (f"error: {checkpoint}: was trained with different settings "
                                    "(optim.lr_head); resume with the run's own config.json, "
                                    "or choose another --out")


# ---------------------------------------------------------------------------------------------
# Crash and resume; processes.

def cli_train(config_path, store_path, annotations_path, out_dir, *extra):
    return [sys.executable, str(REPO / "cli.py"), "train", "--config", str(config_path),
            "--store", str(store_path), "--annotations", str(annotations_path),
            "--out", str(out_dir), "--quiet", *extra]


def wait_for_step(log_path, process, epoch, step, timeout=60.0):
    """Block until the run logs an optimizer step past ``step`` of ``epoch``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if log_path.exists():
            for line in log_path.read_text().splitlines():
                record = json.loads(line) if line.endswith("}") else {}
                if record.get("event") == "step" and record["epoch"] == epoch \
                        and record["step"] >= step:
                    return
        time.sleep(0.005)
    raise AssertionError("the run ended or stalled before the kill point")


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_weights(dataset_files, tmp_path):
    store_path, annotations_path = dataset_files
    # Four steps per epoch: killed after the first step of epoch 3, the run is still three
    # steps (~0.2 s) away from its next checkpoint.
    config = tiny_config(train={"epochs": 4, "batch_size": 1, "micro_batch": 1},
                         eval={"every": 2, "subset": "training"})
    config_path = write_config(tmp_path / "config.json", config)
    train(config, store_path, annotations_path, tmp_path / "straight", progress=False)

    run = tmp_path / "killed"
    process = subprocess.Popen(cli_train(config_path, store_path, annotations_path, run),
                               env=SUBPROCESS_ENV, stderr=subprocess.PIPE)
    wait_for_step(run / "log.jsonl", process, epoch=3, step=9)  # first step of epoch 3
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 2

    resumed = subprocess.run(cli_train(config_path, store_path, annotations_path, run,
                                       "--resume"), env=SUBPROCESS_ENV, capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr
    straight, again = final_weights(tmp_path / "straight"), final_weights(run)
    assert again["epoch"] == 4 and again["best"] == straight["best"]
    assert_same_state(straight["model"], again["model"])
    assert_same_state(straight["ema"], again["ema"])
    for a, b in zip(straight["optimizer"]["state"].values(), again["optimizer"]["state"].values()):
        assert_same_state(a, b)
    assert torch.equal(torch.load(run / "best.pt", weights_only=True)["ema"]["losa.gates"],
                       torch.load(tmp_path / "straight" / "best.pt",
                                  weights_only=True)["ema"]["losa.gates"])


@pytest.mark.slow
def test_two_processes_give_the_weights_of_one(dataset_files, tmp_path):
    store_path, annotations_path = dataset_files
    # Global batch 2 of micro-batches of 1: one process accumulates two, two processes one each.
    config = tiny_config(train={"epochs": 2, "batch_size": 2, "micro_batch": 1})
    config_path = write_config(tmp_path / "config.json", config)
    train(config, store_path, annotations_path, tmp_path / "one", progress=False)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", *cli_train(config_path, store_path, annotations_path,
                                                   tmp_path / "two")[1:]]
    result = subprocess.run(command, env=SUBPROCESS_ENV, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    one, two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert_same_state(one["model"], two["model"])
    assert_same_state(one["ema"], two["ema"])
    log = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert log[0]["world_size"] == 2


def test_weight_decay_spares_gates_norms_and_biases():
    from training.detector import Detector, parameter_groups

    config = tiny_config()
    detector = Detector(DIM, len(CLASSES), len(LAYERS), int(np.prod(TOKENS)), config.model,
                        config.head)
    groups = {g["name"]: g for g in parameter_groups(detector, 1e-3, 2e-3, 0.05)}
    spared = {id(p) for g in groups.values() if g["weight_decay"] == 0 for p in g["params"]}
    assert id(detector.losa.gates) in spared  # 3-D, yet a scale: decay would pull it shut
    assert id(detector.losa.fuse.weight) not in spared
    assert all(id(p) in spared for n, p in detector.named_parameters() if p.ndim < 2)
    assert groups["adapter"]["base_lr"] == 1e-3 and groups["head"]["base_lr"] == 2e-3


def test_tensorboard_event_files_hold_the_logged_scalars(dataset_files, tmp_path):
    """Losses, learning rates, mAP per evaluation and LoSA's gate norms per range and layer,
    against the optimizer step, equal to what log.jsonl records; --no-tensorboard writes none."""
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator")
    store_path, annotations_path = dataset_files
    config_path = write_config(tmp_path / "tiny.json", tiny_config(
        train={"epochs": 2}, eval={"every": 1}))
    args = ["train", "--config", str(config_path), "--store", str(store_path),
            "--annotations", str(annotations_path), "--quiet"]
    code, output = run_cli([*args, "--out", str(tmp_path / "run")])
    assert code == 0, output
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text()
               .splitlines()]
    events = event_accumulator.EventAccumulator(str(tmp_path / "run"))
    events.Reload()

    def series(tag):
        return [(scalar.step, scalar.value) for scalar in events.Scalars(tag)]

    steps = [r for r in records if r["event"] == "step"]
    assert series("loss/step") == [(r["step"], pytest.approx(r["loss"], rel=1e-6))
                                   for r in steps]
    for group in steps[0]["lr"]:
        assert series(f"lr/{group}") == [(r["step"], pytest.approx(r["lr"][group], rel=1e-6,
                                                                   abs=1e-12)) for r in steps]
    evals = [r for r in records if r["event"] == "eval"]
    assert len(evals) == 2
    assert series("mAP/average") == [(r["step"], pytest.approx(r["average_map"], rel=1e-6))
                                     for r in evals]
    assert series("mAP/tIoU_0.50") == [(r["step"], pytest.approx(r["map"]["0.50"], rel=1e-6))
                                       for r in evals]
    gates = {tag for tag in events.Tags()["scalars"] if tag.startswith("losa/gate_norm/")}
    assert gates == {f"losa/gate_norm/{name}/layer_{layer}" for name in ("short", "long")
                     for layer in LAYERS}
    weights = final_weights(tmp_path / "run")["model"]["losa.gates"]
    last_epoch = [r for r in records if r["event"] == "epoch"][-1]
    assert series(f"losa/gate_norm/long/layer_{LAYERS[1]}")[-1] == (
        last_epoch["step"], pytest.approx(float(weights[1, 1].norm()), rel=1e-5))
    code, output = run_cli([*args, "--out", str(tmp_path / "quiet_run"), "--no-tensorboard",
                            "--threads", "3"])
    assert code == 0, output
    assert not list((tmp_path / "quiet_run").glob("events.out.tfevents.*"))
    start = json.loads((tmp_path / "quiet_run" / "log.jsonl").read_text().splitlines()[0])
    assert start["torch_threads"] == 3
