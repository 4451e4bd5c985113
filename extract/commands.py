"""``extract``: the click command of stage one (heavy imports inside the function).

Values come from, in order of precedence: the flags given, the dataset preset
(``--preset thumos`` reads ``configs/datasets/thumos.json``), and the defaults below.
"""
import json
import os
from pathlib import Path

import click

from store.urls import storage_options_flag

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "datasets"
# Used when neither a flag nor the preset gives a value.
DEFAULTS = {"backbone": "vit_g", "layers": [], "tokens": [1, 1, 1], "batch_size": 32,
            "num_workers": 4, "device": "auto", "seed": 0, "subset": None, "format": None}
PRESET_KEYS = {*DEFAULTS, "videos", "store", "checkpoint", "annotations", "protocol",
               "download", "description"}


@click.command()
@click.option("--preset", help="Dataset preset: configs/datasets/<name>.json (thumos, anet).")
@click.option("--videos", "videos_dir", help="Folder of video files.")
@click.option("--out", "store_path", help="Feature store to create or resume (a .h5 path "
              "means HDF5).")
@click.option("--backbone", help="Backbone preset (vit_s|b|l|h|g) or a JSON/YAML file of "
              "VideoMAEv2 constructor arguments.")
@click.option("--checkpoint", help="VideoMAEv2 checkpoint (.pth) to load.")
@click.option("--random-init", is_flag=True, help="Random weights instead of a checkpoint "
              "(smoke tests).")
@click.option("--seed", type=int, help="Seed of the random weights.  [default: 0]")
@click.option("--annotations", help="Only the videos of this annotation file (JSON).")
@click.option("--subset", help="Only this subset of --annotations (default: all subsets).")
@click.option("--clip-len", type=int, help="Frames per clip.  [default: 16]")
@click.option("--clip-stride", type=int, help="Frames between clip starts.  [default: 4]")
@click.option("--frame-interval", type=int, help="Step between a clip's frames.  [default: 1]")
@click.option("--fps", type=float, help="Resample to this frame rate.  [default: native]")
@click.option("--img-size", type=int, help="Backbone input size.  [default: 224]")
@click.option("--resize", type=click.Choice(["direct", "short_side_crop"]),
              help="Resize straight to the size (official) or short side + centre crop.")
@click.option("--normalise", type=click.Choice(["none", "imagenet"]),
              help="Pixel normalisation after scaling to [0, 1].  [default: none]")
@click.option("--resize-on", type=click.Choice(["worker", "device"]),
              help="Resize in the decoding workers (official CPU transform) or on the device "
              "(workers send uint8 frames).  [default: worker]")
@click.option("--tail", type=click.Choice(["drop", "pad"]),
              help="Drop clips past the last frame (official) or pad one more.")
@click.option("--layers", help="Intermediate blocks to store, e.g. 7,15,23,31 (0-based; "
              "'none' for the last layer only).")
@click.option("--tokens", help="Pooled token grid per clip and layer, t x h x w, e.g. 2x2x2.")
@click.option("--batch-size", type=int, help="Clips per backbone batch.  [default: 32]")
@click.option("--num-workers", type=int, help="Decoding processes.  [default: 4]")
@click.option("--device", help="auto, cpu, cuda or cuda:N.  [default: auto]")
@click.option("--format", "store_format", type=click.Choice(["zarr", "hdf5"]),
              help="Store format for a new store.  [default: zarr]")
@click.option("--compile", "compile_model", is_flag=True, help="torch.compile the backbone.")
@storage_options_flag
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.pass_context
def extract(ctx, preset, videos_dir, store_path, backbone, checkpoint, random_init, seed,
            annotations, subset, layers, tokens, batch_size, num_workers, device, store_format,
            compile_model, storage_options, no_progress, **protocol_flags):
    """Encode videos with a frozen VideoMAEv2 and cache its features in a feature store.

    Rerunning the same command resumes: finished videos are skipped. Several extractors (or
    torchrun ranks) may share one store. A video that cannot be decoded is reported and
    skipped; the exit status is then 1.
    """
    from extract.pipeline import (ExtractionSettings, annotated_durations, find_videos,
                                  format_summary, run_extraction)
    from extract.pooling import parse_tokens
    from extract.protocol import SamplingProtocol
    from losa_tal import input_error

    given = {"videos": videos_dir, "store": store_path, "backbone": backbone,
             "checkpoint": checkpoint, "seed": seed, "annotations": annotations,
             "subset": subset, "layers": layers, "tokens": tokens, "batch_size": batch_size,
             "num_workers": num_workers, "device": device, "format": store_format}
    config = {**DEFAULTS, **(_read_preset(preset) if preset else {}),
              **{key: value for key, value in given.items() if value is not None}}
    if random_init:
        config["checkpoint"] = None
    protocol_record = {**config.get("protocol", {}),
                       **{k: v for k, v in protocol_flags.items() if v is not None}}
    hints = config.get("download", {})
    for key, flag in (("videos", "--videos"), ("store", "--out")):
        if not config.get(key):
            raise input_error(flag, "required (or use --preset)")
    if not random_init and not config.get("checkpoint"):
        raise input_error("--checkpoint", "give a checkpoint, or --random-init for random "
                          "weights")
    if config.get("checkpoint") and not Path(config["checkpoint"]).is_file():
        raise input_error(config["checkpoint"], "checkpoint not found; " + hints.get(
            "checkpoint", "download it or pass --checkpoint PATH"))
    if not Path(config["videos"]).is_dir():
        raise input_error(config["videos"], "video folder not found; " + hints.get(
            "videos", "put the videos there or pass --videos DIR"))
    if config.get("annotations") and not Path(config["annotations"]).is_file():
        raise input_error(config["annotations"], "annotation file not found; " + hints.get(
            "annotations", "check the path given to --annotations"))

    durations = annotated_durations(config["annotations"], config["subset"]) \
        if config.get("annotations") else {}
    videos, missing = find_videos(config["videos"],
                                  list(durations) if config.get("annotations") else None)
    settings = ExtractionSettings(
        videos=videos, store=config["store"],
        backbone=_backbone_spec(config["backbone"]), backbone_source=str(config["backbone"]),
        protocol=SamplingProtocol.from_dict(protocol_record),
        layers=_parse_layers(config["layers"]), tokens=parse_tokens(config["tokens"]),
        checkpoint=config.get("checkpoint"), seed=config["seed"],
        batch_size=config["batch_size"], num_workers=config["num_workers"],
        device=config["device"], format=config["format"], compile=compile_model,
        storage_options=storage_options,
        expected_durations={vid: d for vid, d in durations.items() if d})
    with _rank_group() as total_failures:
        summary = run_extraction(settings, show_progress=not no_progress)
        failures = total_failures(len(summary.failed))
    click.echo(format_summary(summary, missing))
    if failures:
        ctx.exit(1)


def _read_preset(name: str) -> dict:
    from losa_tal import input_error

    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.json"))
        raise input_error("--preset", f"no preset {name!r} (known: {', '.join(known)})")
    preset = _read_mapping(path)
    unknown = sorted(set(preset) - PRESET_KEYS)
    if unknown:
        raise input_error(path, f"unknown keys {unknown} (known: {sorted(PRESET_KEYS)})")
    return preset


def _read_mapping(path) -> dict:
    """A JSON or YAML file holding one object."""
    import yaml

    from losa_tal import TOO_DEEP, input_error, load_yaml

    try:
        text = Path(path).read_text()
        data = load_yaml(text) if str(path).lower().endswith((".yaml", ".yml")) else \
            json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as err:
        raise input_error(path, f"cannot read: {' '.join(str(err).split())[:200]}") from None
    except RecursionError:
        raise input_error(path, f"cannot read: {TOO_DEEP}") from None
    if not isinstance(data, dict):
        raise input_error(path, "expected an object of settings")
    return data


def _backbone_spec(value):
    """A preset name, or the kwargs of a JSON/YAML file (a dict in a preset passes through)."""
    if isinstance(value, dict):
        return value
    if str(value).lower().endswith((".json", ".yaml", ".yml")) or os.path.isfile(value):
        return _read_mapping(value)
    return value


def _parse_layers(value) -> list:
    from losa_tal import input_error

    if isinstance(value, list):
        return value
    text = str(value).strip().lower()
    if text in ("", "none"):
        return []
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise input_error("--layers", f"expected block indices like 7,15,23,31, got {value!r}") \
            from None


class _rank_group:
    """Under torchrun, a gloo group joining the ranks at the end, so that every rank learns the
    total failure count (and none exits early with an error, which would make torchrun stop the
    others mid-video). Outside torchrun, nothing."""

    def __enter__(self):
        import datetime

        import torch.distributed as dist

        self.dist = dist
        self.joined = int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized()
        if self.joined:  # ranks may finish hours apart: wait for each other that long
            dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
        return self.total

    def total(self, count: int) -> int:
        if not self.joined:
            return count
        import torch

        value = torch.tensor([count])
        self.dist.all_reduce(value)
        return int(value.item())

    def __exit__(self, *exc):
        if self.joined:
            self.dist.destroy_process_group()
        return False


@click.group()
def videos():
    """Inspect a folder of videos before extracting it."""


@videos.command("check")
@click.argument("folder")
@click.option("--annotations", help="Only the videos of this annotation file (JSON); their "
              "annotated durations are checked.")
@click.option("--subset", help="Only this subset of --annotations (default: all subsets).")
@click.option("--json", "json_out", help="Also write the report to this JSON file.")
@click.option("--preset", help="Probe with this dataset preset's protocol (thumos, anet).")
@click.option("--fps", type=float, help="Probe with this resampled rate.  [default: native]")
@click.option("--frame-interval", type=int, help="Probe with this frame interval.")
@click.option("--clip-stride", type=int, help="Probe with this clip stride.")
@click.option("--clips", "probe_clips", type=int, default=3, show_default=True,
              help="Clips per video in the frame-accuracy probe.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.pass_context
def check(ctx, folder, annotations, subset, json_out, preset, probe_clips, no_progress,
          **protocol_flags):
    """Will each video in FOLDER be extracted right? One line per video, exit 1 if not.

    For every video: whether it opens (and why not), codec and container, frames counted
    against frames decoded, average against measured frame rate, duration against the
    annotation, and a frame-accuracy probe (a few clips as extraction reads them, against a
    sequential decode). Exit status 1 when some video would be extracted wrongly or skipped.
    """
    from tqdm import tqdm

    from evaluation.files import write_json_atomic
    from extract.check import BAD, check_video, format_table
    from extract.pipeline import annotated_durations, find_videos
    from extract.protocol import SamplingProtocol
    from losa_tal import input_error

    if annotations and not Path(annotations).is_file():
        raise input_error(annotations, "annotation file not found")
    if probe_clips < 1:
        raise input_error("--clips", "must be positive")
    durations = annotated_durations(annotations, subset) if annotations else {}
    found, missing = find_videos(folder, list(durations) if annotations else None)
    protocol = SamplingProtocol.from_dict(
        {**(_read_preset(preset).get("protocol", {}) if preset else {}),
         **{k: v for k, v in protocol_flags.items() if v is not None}})
    records = []
    for video_id, path in tqdm(found, unit="video", desc="check", disable=no_progress):
        records.append(check_video(video_id, path, protocol, durations.get(video_id),
                                   probe_clips))
    counts = {status: sum(r["status"] == status for r in records)
              for status in ("ok", "warning", "wrong", "fails")}
    if json_out:
        write_json_atomic(json_out, {"folder": str(folder), "protocol": protocol.to_dict(),
                                     "summary": {**counts, "missing": missing},
                                     "videos": records})
    click.echo(format_table(records))
    click.echo(f"{len(records)} videos: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        click.echo(f"  {len(missing)} annotated videos have no file in the folder: {shown}")
    if any(r["status"] in BAD for r in records):
        ctx.exit(1)
