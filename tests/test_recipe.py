"""The training recipe's ActionFormer pieces, against values worked out from ActionFormer's
definitions: the per-iteration lr schedule, the crop-ratio jitter of training windows, and the
loss normaliser moved by the step's own positive count before the losses are divided."""
import math

import numpy as np
import pytest
import torch

from helpers.training import (CLASSES, DIM, make_dataset, tiny_config, write_annotations,
                              write_store)
from training.data import collate
from training.detector import Detector
from training.train import learning_rate


def actionformer_schedule(base, warmup, total, eta_min=1e-8):
    """ActionFormer's LinearWarmupCosineAnnealingLR stepped once per iteration, in its
    chainable (recursive) form: the lr each optimizer step uses."""
    lrs, lr = [], 0.0
    for step in range(total):
        if step == 0:
            lr = 0.0
        elif step < warmup:
            lr = lr + base / (warmup - 1)
        elif step == warmup:
            lr = base
        elif (step - 1 - total) % (2 * (total - warmup)) == 0:
            lr = lr + (base - eta_min) * (1 - math.cos(math.pi / (total - warmup))) / 2
        else:
            lr = ((1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
                  / (1 + math.cos(math.pi * (step - warmup - 1) / (total - warmup)))
                  * (lr - eta_min) + eta_min)
        lrs.append(lr)
    return lrs


def test_the_lr_schedule_is_actionformers_per_iteration():
    # THUMOS: 5 warmup epochs + 30, here at 4 iterations per epoch.
    warmup, total, base = 5 * 4, 35 * 4, 1e-4
    ours = [learning_rate(step, base, warmup, total, 1e-8) for step in range(total)]
    assert ours == pytest.approx(actionformer_schedule(base, warmup, total), rel=1e-9, abs=1e-15)
    assert ours[0] == 0.0 and ours[1] == pytest.approx(base / 19) and ours[19] == base
    assert ours[20] == base and learning_rate(total, base, warmup, total, 1e-8) == 1e-8


def video_store(tmp_path, lengths):
    """One training video per length, each with one short action at its centre."""
    videos = {}
    for i, n in enumerate(lengths):
        times = (np.arange(n) * 4 + 8) / 30.0
        centre = n // 2
        videos[f"video_{i:03d}"] = {
            "subset": "training", "times": times,
            "last": np.zeros((n, DIM), np.float32),
            "annotations": [{"segment": [float(times[centre]), float(times[centre + 6])],
                             "label": CLASSES[0]}]}
    return (write_store(tmp_path / "store.zarr", videos, layers=()),
            write_annotations(tmp_path / "gt.json", videos))


def windows(dataset, epochs):
    out = []
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            sample = dataset[index]
            out.append((index, sample["step_offset"], sample["last"].shape[0], sample))
    return out


def test_short_videos_get_actionformers_crop_ratio_jitter(tmp_path):
    store, annotations = video_store(tmp_path, [100, 300])
    dataset = make_dataset(store, annotations, layers=(), max_seq_len=200)
    seen = {0: set(), 1: set()}
    for index, start, length, _ in windows(dataset, 60):
        seen[index].add(length)
        if length == 100:
            assert start == 0
    # 100 steps <= 200: lengths randint(round(0.9 * 100), round(1.0 * 100)) = 90 ... 100;
    # 300 > 200: always max_seq_len, no jitter.
    assert seen[0] == set(range(90, 101)) and seen[1] == {200}
    whole = make_dataset(store, annotations, layers=(), max_seq_len=200, crop_ratio=None)
    assert {length for index, _, length, _ in windows(whole, 5) if index == 0} == {100}


def test_up_to_200_crops_are_tried_to_keep_the_action(tmp_path):
    # 2000 steps, windows of 40, one action of 6 steps: a random start keeps it with odds
    # 35 / 1961, so 8 tries would miss it in 86% of the draws and 200 tries in 3%.
    store, annotations = video_store(tmp_path, [2000])
    kept = [len(s["segments"]) > 0 for *_, s in windows(
        make_dataset(store, annotations, layers=(), max_seq_len=40), 40)]
    few = [len(s["segments"]) > 0 for *_, s in windows(
        make_dataset(store, annotations, layers=(), max_seq_len=40, window_tries=8), 40)]
    assert sum(kept) >= 34 and sum(few) <= 16


def test_positives_are_counted_before_the_forward_pass_as_the_loss_counts_them(tmp_path):
    store, annotations = video_store(tmp_path, [100, 150])
    dataset = make_dataset(store, annotations, layers=(), max_seq_len=200, crop_ratio=None)
    config = tiny_config(model={"type": "head_only"})
    torch.manual_seed(0)
    detector = Detector(DIM, len(CLASSES), 0, 1, config.model, config.head)
    batch = collate([dataset[0], dataset[1]])
    count = detector.count_positives(batch)
    assert count > 0
    assert count == int(detector.loss(detector(batch), batch)["num_positives"])


def step_losses(dataset_files, tmp_path, order):
    import json

    from training.train import train

    config = tiny_config(model={"type": "head_only"}, head={"max_seq_len": 96},
                         train={"epochs": 1, "normalizer_update": order},
                         optim={"lr_head": 0.0, "warmup_epochs": 0})
    train(config, *dataset_files, tmp_path / order, progress=False)
    log = [json.loads(line) for line in (tmp_path / order / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in log if r["event"] == "step"]


def test_each_step_divides_by_the_normaliser_its_own_count_has_moved(dataset_files, tmp_path):
    # With lr 0 the weights never move, so both orders see the same raw loss sum S_k at step k;
    # "before" divides it by N_k = 0.9 N_(k-1) + 0.1 c_k, "after" by N_(k-1) (N_0 = 100). The
    # ratio of the two logged losses then gives back c_k, which must be a whole count.
    before = step_losses(dataset_files, tmp_path, "before")
    after = step_losses(dataset_files, tmp_path, "after")
    normaliser = 100.0
    for loss_before, loss_after in zip(before, after):
        updated = normaliser * loss_after / loss_before
        count = (updated - 0.9 * normaliser) / 0.1
        assert count >= 1 and count == pytest.approx(round(count), abs=1e-3)
        normaliser = updated
    assert len(before) == 2 and before != after
