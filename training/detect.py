"""``detect``: raw video files -> detections, with a trained run and nothing else.

    videos --> stage one with the settings the run's features were extracted with (its
      checkpoint's store signature: backbone, checkpoint, protocol, layers, tokens) into a
      cache store, ``OUT/features.zarr`` --> the run's detector --> ``OUT/detections.json``
      (ActivityNet layout) and ``OUT/<video>.png`` (a timeline per video)

The cache store keeps each video's features: a second call on the same videos builds no
backbone and extracts nothing. The backbone checkpoint is found where the run's training store
says it was (or given with ``checkpoint``, where it has moved); a store made from other weights
is refused by the same check as ``infer``'s.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from losa_tal import input_error

STORE_DIR = "features.zarr"
DETECTIONS_FILE = "detections.json"
SUBSET = "detect"  # the one subset of the annotation-free video list handed to the dataset


def detect(video_files, run, out_dir, checkpoint=None, device=None, progress=False,
           figures=True, storage_options=None) -> dict:
    """Detect actions in ``video_files`` with the run (or checkpoint file) ``run``; writes into
    ``out_dir`` and returns ``{"detections": path, "figures": [paths], "extracted": [ids]}``."""
    from training import checkpoint as ckpt
    from training.config import Config
    from training.infer import checkpoint_path

    path = checkpoint_path(run)
    state = ckpt.load(path)
    config = Config.from_dict(state["config"], f"{path} (config)")
    videos = _video_ids(video_files)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    store_path = out_dir / STORE_DIR
    extracted = _extract_missing(videos, state, path, store_path, checkpoint, device, progress,
                                 storage_options)
    predictions = _predict(state, config, path, store_path, [vid for vid, _ in videos], device,
                           progress)
    from training.infer import write_predictions

    detections = out_dir / DETECTIONS_FILE
    write_predictions(detections, predictions)
    drawn = []
    if figures:
        from evaluation.timeline import plot_timeline

        drawn = [plot_timeline(None, predictions, vid, out_dir / f"{vid}.png", video_file=file)
                 for vid, file in videos]
    return {"detections": str(detections), "figures": drawn, "extracted": extracted}


def _video_ids(video_files) -> list:
    """``[(video_id, path)]``: the id is the file name without its extension, as extract's."""
    videos, seen = [], {}
    for file in map(Path, video_files):
        if not file.is_file():
            raise input_error(file, "no such video file")
        if file.stem in seen:
            raise input_error(file, f"has the video id {file.stem!r} of {seen[file.stem]} too; "
                              "rename one")
        seen[file.stem] = file
        videos.append((file.stem, str(file)))
    if not videos:
        raise input_error("VIDEO", "give at least one video file")
    return videos


def run_settings(state: dict, where: str):
    """The extraction settings of the store the run was trained on (``extract.recorded``), with
    the checkpoint's last known place from that store, if it is still reachable."""
    from extract.recorded import Recorded
    from training.inputs import recorded_input

    signature = dict(state["store"])
    if not isinstance(signature.get("backbone"), dict) or "kwargs" not in signature["backbone"] \
            or not isinstance(signature.get("protocol"), dict):
        raise input_error(where, "was trained on features whose backbone and protocol are not "
                          "recorded (an imported store); extract the videos yourself and use "
                          "infer")
    store = recorded_input((state.get("inputs") or {}).get("store"), "")
    if store and Path(store).exists():
        from store import FeatureStore

        with FeatureStore.open(store) as trained_on:
            signature["checkpoint_path"] = trained_on.meta.get("checkpoint_path")
    return Recorded.from_meta(signature, where)


def _extract_missing(videos, state, path, store_path, checkpoint, device, progress,
                     storage_options) -> list:
    """Extract the videos the cache store lacks (none: no backbone is built); their ids."""
    from extract.config import ExtractionConfig
    from extract.recorded import checkpoint_for, taken_from

    if store_path.exists():
        from store import FeatureStore

        with FeatureStore.open(store_path) as cached:
            missing = [(vid, file) for vid, file in videos if vid not in cached]
    else:
        missing = list(videos)
    if not missing:
        return []
    recorded = run_settings(state, f"{path}: the run's features")
    config = taken_from(recorded, ExtractionConfig(store=str(store_path), num_workers=0,
                                                   device=device or "auto"), explicit=())
    if checkpoint is not None:
        config = dataclasses.replace(config, checkpoint=str(checkpoint))
    checkpoint_for(recorded, config)
    from extract.pipeline import ExtractionSettings, format_summary, run_extraction

    summary = run_extraction(ExtractionSettings(config, videos=missing,
                                                storage_options=storage_options,
                                                backbone_source="the run's backbone"),
                             show_progress=progress)
    if summary.failed:
        video, reason = next(iter(summary.failed.items()))
        raise input_error(dict(missing)[video], f"could not extract: {reason}")
    if progress:
        print(format_summary(summary))
    return [vid for vid, _ in missing]


def _predict(state, config, path, store_path, video_ids, device, progress) -> dict:
    import torch

    from evaluation import load_annotations
    from training import checkpoint as ckpt
    from training.data import StoreDataset
    from training.infer import build_trained_detector, predict
    from training.inputs import open_store

    store = open_store(store_path, config.data.dataset)
    ckpt.check_store_matches(state["store"], store, path)
    # No ground truth: the videos to predict, as the dataset reads them, without segments.
    videos = load_annotations({"database": {vid: {"subset": SUBSET, "annotations": []}
                                            for vid in video_ids}})
    dataset = StoreDataset(store, videos, SUBSET, state["classes"], state["store"]["layers"],
                           config.data, train=False)
    model = build_trained_detector(state, config, store, path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return predict(model.to(device), dataset, config.postprocess, device, state["classes"],
                   amp=config.train.amp, progress=progress)
