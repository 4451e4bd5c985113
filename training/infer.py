"""Inference: a trained checkpoint + a feature store -> ActivityNet-format predictions.

``python cli.py infer --run RUN_DIR --store STORE --annotations JSON --subset test --out P.json``
or, from Python (the demo does this)::

    from training.infer import infer
    predictions = infer("runs/thumos", store_path, annotations_path, subset="test",
                        out_path="preds.json")

Each video is run whole or, in window mode with ``data.infer_window`` set, as overlapping windows
whose candidates are merged per video before NMS; segments are turned into seconds through the
feature times the store recorded for that video.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from losa_tal import InputError, input_error, write_output
from training import checkpoint as ckpt
from training.config import Config
from training.data import (StoreDataset, batch_to, collate, head_label, steps_to_seconds,
                           to_video_steps)
from training.detector import Detector
from training.inputs import open_annotations, open_store, recorded_input, resolve_subset


def inference_device(device=None) -> torch.device:
    """The device given, else the GPU where there is one (the command prints which)."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def infer(run_or_checkpoint, store_path=None, annotations_path=None, subset=None,
          out_path=None, device=None, progress: bool = False, video_scores=None,
          topk=None, storage_options=None) -> dict:
    """Predict every video of ``subset`` that the store holds; optionally write the JSON file.

    With ``video_scores`` (a scores file, the ActivityNet protocol), the detections are labelled
    by :func:`evaluation.fusion.fuse_predictions` with the ``topk`` best classes of each video.
    """
    path = checkpoint_path(run_or_checkpoint)
    state = ckpt.load(path)
    config = Config.from_dict(state["config"], f"{path} (config)")
    inputs = state.get("inputs") or {}  # what the run was trained on; the flags override it
    store = open_store(store_path or recorded_input(inputs.get("store"), config.data.store),
                       config.data.dataset, storage_options)
    ckpt.check_store_matches(state["store"], store, path)
    annotations = open_annotations(annotations_path or recorded_input(
        inputs.get("annotations"), config.data.annotations))
    layers = state["store"]["layers"]
    model = build_trained_detector(state, config, store, path)
    device = inference_device(device)
    name = resolve_subset(annotations, subset or config.eval.subset, train=False)
    dataset = StoreDataset(store, annotations, name, state["classes"], layers, config.data,
                           train=False)
    scores = None if video_scores is None else _checked_video_scores(video_scores, dataset)
    predictions = predict(model.to(device), dataset, config.postprocess, device, state["classes"],
                          amp=config.train.amp, progress=progress)
    if scores is not None:
        from evaluation.fusion import TOPK, fuse_predictions

        predictions = fuse_predictions(predictions, scores, topk or TOPK)
    if out_path is not None:
        write_predictions(out_path, predictions)
    return predictions


def _checked_video_scores(path, dataset):
    """The scores file, with every video to predict checked before inference starts."""
    from evaluation.fusion import load_video_scores

    scores = load_video_scores(path)
    for vid in dataset.videos:
        scores.lookup(vid, dataset.store.path)
    return scores


def checkpoint_path(run_or_checkpoint) -> Path:
    """A run directory means its best.pt (or last.pt before any evaluation); a file is itself."""
    path = Path(run_or_checkpoint)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise input_error(path, "run directory holds no checkpoint (best.pt or last.pt)")
    return path


def build_trained_detector(state: dict, config: Config, store, path) -> Detector:
    """The detector checkpoint ``state`` (with its parsed ``config``) describes, with its EMA
    weights; a weight mismatch is one line naming ``path``."""
    model = Detector(store.feature_dim, len(state["classes"]), len(state["store"]["layers"]),
                     store.num_tokens, config.model, config.head,
                     standardise=config.data.standardise)
    ckpt.load_into(model, state["ema"], path, "ema")
    return model.eval()


@torch.no_grad()
def predict(model, dataset: StoreDataset, postprocess_config, device, classes, amp=True,
            progress=False, world=None) -> dict:
    """``{"results": {video: [{"segment": [s, e], "label", "score"}]}}`` for a dataset.

    Under data parallelism (``world``) each process predicts every ``world.size``-th video and
    the detections are gathered, so every process returns the same predictions whatever the
    number of processes: a video's result depends only on its own pieces.
    """
    from tqdm import tqdm

    import losa_distributed as distributed

    world = world or distributed.World(device=torch.device(device))
    mine = dataset.videos[world.rank::world.size]
    share = set(mine)
    pieces = [i for i, (vid, _, _) in enumerate(dataset.pieces) if vid in share]
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, pieces), batch_size=1,
                                         collate_fn=collate, num_workers=dataset.config.num_workers,
                                         pin_memory=torch.device(device).type == "cuda")
    candidates = {vid: [] for vid in mine}
    use_amp = amp and torch.device(device).type == "cuda"
    for batch in tqdm(loader, desc="inference", unit="piece", disable=not progress):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=use_amp):
            outputs = model(batch_to(batch, device, use_amp))
        for sample, found in zip(batch["samples"], model.candidates(outputs, postprocess_config)):
            found["segments"] = torch.from_numpy(
                to_video_steps(found["segments"].float().cpu().numpy(), sample))
            candidates[sample["video"]].append(found)
    model.train(was_training)
    results = {}
    for vid, parts in candidates.items():
        segments, scores, labels = _suppress(parts, postprocess_config)
        results[vid] = _to_entries(segments, scores, labels, dataset, vid, classes)
    gathered = {vid: entries for part in distributed.gather_json(world, results)
                for vid, entries in part.items()}
    results = {vid: gathered[vid] for vid in dataset.videos}
    return {"version": "losa-tal", "results": results, "external_data": {}}


def _suppress(parts, options):
    """Per-class NMS over the candidates of all pieces of one video, then boundary voting."""
    from head.nms import suppress

    segments = torch.cat([p["segments"].double() for p in parts])
    scores = torch.cat([p["scores"].float().cpu() for p in parts]).double()
    labels = torch.cat([p["labels"].cpu() for p in parts])
    kept_segments, kept_scores, kept_labels = suppress(
        segments, scores, labels, options.nms_method, options.iou_threshold, options.sigma,
        options.min_score, options.max_segments, options.voting_iou)
    return kept_segments.numpy(), kept_scores.numpy(), kept_labels.numpy()


def _to_entries(segments, scores, labels, dataset, vid, classes) -> list:
    times = dataset.times[vid]
    seconds = steps_to_seconds(segments.reshape(-1), times).reshape(-1, 2)
    from store.verify import video_length

    store = dataset.store
    length = video_length(store.meta["protocol"], store.video_info(vid), times)
    seconds = np.clip(seconds, 0.0, length)
    return [{"segment": [round(float(s), 3), round(float(e), 3)], "label": classes[int(c)],
             "score": float(p)}
            for (s, e), p, c in zip(seconds, scores, labels) if e > s]


def evaluate_predictions(annotations, predictions: dict, dataset: StoreDataset,
                         eval_config) -> dict:
    """mAP report over exactly the videos of ``dataset`` (those the store holds, capped).

    A class-agnostic head is scored against every action relabelled as its one class.
    """
    from evaluation import evaluate_map

    truth = annotations.select(dataset.videos, lambda label: head_label(label, dataset.config))
    return evaluate_map(truth, predictions, subset=dataset.subset,
                        tiou_thresholds=eval_config.tiou_thresholds)


def write_predictions(path, predictions: dict) -> None:
    """Write atomically and durably (``losa_tal.open_output``): never half a file."""
    try:
        write_output(path, json.dumps(predictions), durable=True)
    except OSError as err:
        raise InputError(f"{path}: cannot write predictions ({err.strerror or err})") from None
