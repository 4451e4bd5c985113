"""``extract`` and ``videos check``: the click commands of stage one (heavy imports inside the
functions).

Settings (``ExtractionConfig``, extract/config.py, holds their defaults) come from, in order of
precedence: the flags given, ``--set key=value``, the dataset preset (``--preset thumos`` reads
``configs/datasets/thumos.json``) and the defaults. Library code refuses a value with a
``ConfigError`` naming its key; ``losa_tal.flag_errors`` turns it, here as in every command,
into the one-line error naming where the value came from: its flag, ``--set``, or the preset
file and key.
"""
import dataclasses
import os
from pathlib import Path

import click

from extract.config import PRESET_DIR, STORE_FORMATS, ExtractionConfig, parse_tokens
from losa_tal import flag_errors, read_config_file
from store.protocol import NORMALISATIONS, RESIZE_MODES, RESIZE_PLACES, TAIL_POLICIES
from store.urls import storage_options_flag

DEFAULT = ExtractionConfig()
# The flag that sets each key (dotted below a section); the click destination is the last part.
FLAGS = {"videos": "--videos", "store": "--out", "backbone": "--backbone",
         "checkpoint": "--checkpoint", "seed": "--seed", "annotations": "--annotations",
         "subset": "--subset", "layers": "--layers", "tokens": "--tokens",
         "batch_size": "--batch-size", "num_workers": "--num-workers", "device": "--device",
         "format": "--format",
         **{f"protocol.{field.name}": "--" + field.name.replace("_", "-")
            for field in dataclasses.fields(DEFAULT.protocol)}}


def option(key: str, help: str, shown=None, **kwargs):
    """The click option of dotted ``key`` (its flag in FLAGS, its destination the last part),
    its help ending with the ExtractionConfig default (as ``shown``, if given; "": none)."""
    value = DEFAULT
    for part in key.split("."):
        value = getattr(value, part)
    shown = value if shown is None else shown
    return click.option(FLAGS[key], key.rpartition(".")[2],
                        help=help + (f"  [default: {shown}]" if shown != "" else ""), **kwargs)


@click.command()
@click.option("--preset", help="Dataset preset: configs/datasets/<name>.json (thumos, anet).")
@option("videos", "Folder of video files.", shown="")
@option("store", "Feature store to create or resume (a .h5 path means HDF5).", shown="")
@option("backbone", "Backbone preset (vit_s|b|l|h|g) or a JSON/YAML file of VideoMAEv2 "
        "constructor arguments.")
@option("checkpoint", "VideoMAEv2 checkpoint (.pth) to load.", shown="")
@click.option("--random-init", is_flag=True, help="Random weights instead of a checkpoint "
              "(smoke tests).")
@click.option("--like", "like", metavar="STORE", help="Take the backbone, checkpoint, layers, "
              "tokens and protocol of this feature store (flags and --set still win).")
@option("seed", "Seed of the random weights.", type=int)
@option("annotations", "Only the videos of this annotation file (JSON).", shown="")
@option("subset", "Only this subset of --annotations.", shown="all subsets")
@option("protocol.clip_len", "Frames per clip.", type=int)
@option("protocol.clip_stride", "Frames between clip starts.", type=int)
@option("protocol.frame_interval", "Step between a clip's frames.", type=int)
@option("protocol.fps", "Resample to this frame rate.", shown="native", type=float)
@option("protocol.img_size", "Backbone input size.", type=int)
@option("protocol.resize", "Resize straight to the size (official) or short side + centre crop.",
        type=click.Choice(RESIZE_MODES))
@option("protocol.normalise", "Pixel normalisation after scaling to [0, 1].",
        type=click.Choice(NORMALISATIONS))
@option("protocol.resize_on", "Resize in the decoding workers (official CPU transform) or on the "
        "device (workers send uint8 frames).", type=click.Choice(RESIZE_PLACES))
@option("protocol.tail", "Drop clips past the last frame (official) or pad one more.",
        type=click.Choice(TAIL_POLICIES))
@option("layers", "Intermediate blocks to store, e.g. 7,15,23,31 (0-based; 'none' for the last "
        "layer only).", shown="none")
@option("tokens", "Pooled token grid per clip and layer, t x h x w, e.g. 2x2x2.",
        shown="x".join(map(str, DEFAULT.tokens)))
@option("batch_size", "Clips per backbone batch.", type=int)
@option("num_workers", "Decoding processes.", type=int)
@option("device", "auto, cpu, cuda or cuda:N.")
@option("format", "Store format for a new store.", shown="by the --out path, else zarr",
        type=click.Choice(STORE_FORMATS))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Set a preset key, e.g. --set protocol.fps=15 (repeatable; flags win).")
@click.option("--compile", "compile_model", is_flag=True, help="torch.compile the backbone.")
@click.option("--shard", metavar="I/N", help="Be shard I of N (0-based).  [default: from "
              "torchrun, Slurm tasks or a Slurm job array, else 0/1]")
@storage_options_flag
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def extract(ctx, preset, random_init, like, overrides, compile_model, shard, storage_options,
            quiet, **flags):
    """Encode videos with a frozen VideoMAEv2 and cache its features in a feature store.

    Rerunning the same command resumes: finished videos are skipped. Several extractors
    (shards: torchrun ranks, Slurm tasks, job array tasks, or --shard) share one store. Into an
    existing store, every setting it records is taken from it (a flag that contradicts it is
    refused). A video that cannot be decoded is reported and skipped; the exit status is then 1.
    """
    from extract.shards import launcher_shard

    shard = launcher_shard(explicit=shard)
    given = dict(flags_by_key(flags))
    if "layers" in given:
        given["layers"] = _parse_layers(given["layers"])
    if "tokens" in given:
        with flag_errors(FLAGS):
            given["tokens"] = list(parse_tokens(given["tokens"]))
    backbone_source = FLAGS["backbone"]
    if "backbone" in given:
        backbone_source, given["backbone"] = _backbone_spec(given["backbone"])
    config, origins = load_config(preset, given, overrides)
    if random_init or (config.random_init and not config.checkpoint):
        config = dataclasses.replace(config, checkpoint=None)
        origins["checkpoint"] = "--random-init" if random_init else origins["random_init"]
        random_init = True
    config, origins, random_init = recorded_settings(config, origins, like, random_init,
                                                     storage_options)
    if "backbone" in origins and origins["backbone"] != FLAGS["backbone"]:
        backbone_source = f"{origins['backbone']}: backbone"
    with flag_errors(FLAGS, origins):
        config = geometry_from_backbone(config, origins, backbone_source)
    check_inputs(config, random_init)
    # Only now torch: a bad setting is refused in a fraction of a second.
    from extract.pipeline import (ExtractionSettings, annotated_durations, find_videos,
                                  format_summary, run_extraction)

    durations = annotated_durations(config.annotations, config.subset) \
        if config.annotations else {}
    videos, missing = find_videos(config.videos, list(durations) if config.annotations else None)
    settings = ExtractionSettings(
        config=config, videos=videos, compile=compile_model, storage_options=storage_options,
        backbone_source=backbone_source, shard=shard,
        expected_durations={vid: d for vid, d in durations.items() if d})
    click.echo(str(shard))
    with flag_errors(FLAGS, origins), _rank_group() as total_failures:
        summary = run_extraction(settings, show_progress=not quiet)
        failures = total_failures(len(summary.failed))
    click.echo(format_summary(summary, missing))
    if failures:
        ctx.exit(1)


def recorded_settings(config, origins: dict, like, random_init: bool, storage_options):
    """``(config, origins, random_init)`` with the settings a store records: those of ``--like
    STORE`` where no flag or --set gives them, then, for an existing ``--out`` store, every
    one (refusing, before any model is built, an explicit value that contradicts it)."""
    from extract.recorded import (RECORDED_KEYS, checkpoint_for, existing_store,
                                  refuse_contradictions, taken_from)

    explicit = {key: source for key, source in origins.items()
                if source in FLAGS.values() or source in ("--set", "--random-init")}
    if like:
        model = existing_store(like, storage_options)
        if model is None:
            from losa_tal import input_error

            raise input_error(like, "no feature store there (--like)")
        config = taken_from(model, config, explicit)
        random_init = random_init or ("checkpoint" not in explicit and model.random_weights())
        origins.update({key: "--like" for key in RECORDED_KEYS if key not in explicit})
    recorded = existing_store(config.store, storage_options) if config.store else None
    if recorded is None:
        return config, origins, random_init
    with flag_errors(FLAGS, origins):
        refuse_contradictions(recorded, config, origins, random_init)
        config = taken_from(recorded, config, origins)
        random_init = recorded.random_weights()
        checkpoint_for(recorded, config)
    return config, origins, random_init


def geometry_from_backbone(config, origins: dict, source: str):
    """A backbone file's ``img_size`` and ``all_frames`` are the clip geometry unless the
    protocol's ``img_size`` and ``clip_len`` are given too (then the two must agree): a flag's
    default never replaces a value the user wrote."""
    from losa_tal import ConfigError

    if not isinstance(config.backbone, dict) or origins.get("backbone", "--like") == "--like":
        return config  # a store's backbone: its geometry is its protocol's
    protocol = {}
    for backbone_key, protocol_key in (("img_size", "img_size"), ("all_frames", "clip_len")):
        if backbone_key not in config.backbone:
            continue
        value, current = config.backbone[backbone_key], getattr(config.protocol, protocol_key)
        key = f"protocol.{protocol_key}"
        if key not in origins and "protocol" not in origins:
            protocol[protocol_key] = value
        elif value != current:
            raise ConfigError(key, f"{current} but the backbone's {backbone_key} is {value} "
                              f"({source}); give one")
    return dataclasses.replace(config, protocol=dataclasses.replace(config.protocol, **protocol))


def flags_by_key(flags: dict):
    """``(key, value)`` of each flag given (click destinations back to dotted keys)."""
    for key in FLAGS:
        value = flags.get(key.rpartition(".")[2])
        if value is not None:
            yield key, value


def load_config(preset, given: dict, overrides=()) -> tuple:
    """``(ExtractionConfig, origins)`` from the defaults, the preset, ``--set`` items and the
    flags' values (``given``, by dotted key). ``origins`` says where each key set came from
    (a flag, ``--set`` or the preset file), for ``flag_errors``. Each source is checked for what
    it decides: a preset value that --set or a flag replaces is not looked at."""
    from losa_tal import ConfigError, apply_overrides, build_config, parse_override

    replaced = {*given, *(".".join(parse_override(item)[0]) for item in overrides)}
    raw, origins = {}, {}
    config = DEFAULT
    if preset:
        path = _preset_path(preset)
        raw = _without(read_config_file(path), replaced)
        config = build_config(ExtractionConfig, raw, str(path))  # names the file and key
        origins = {key: str(path) for key in _leaf_keys(raw)}
    if overrides:
        apply_overrides(raw, overrides)
        config = build_config(ExtractionConfig, raw, "--set")
        origins.update({".".join(parse_override(item)[0]): "--set" for item in overrides})
    origins.update({key: FLAGS[key] for key in given})
    section = {key: value for key, value in given.items() if "." not in key}
    protocol = {key.partition(".")[2]: value for key, value in given.items() if "." in key}
    with flag_errors(FLAGS, origins):
        try:
            section["protocol"] = dataclasses.replace(config.protocol, **protocol)
        except ConfigError as err:
            raise ConfigError(f"protocol.{err.key}", err.problem) from None
        config = dataclasses.replace(config, **section)
        config.check()
    return config, origins


def _leaf_keys(raw: dict) -> list:
    """The preset's keys, its protocol section's by field (``protocol.fps``): a field the
    preset leaves at its default was not given by it."""
    keys = [key for key in raw if key != "protocol"]
    if isinstance(raw.get("protocol"), dict):
        keys += [f"protocol.{name}" for name in raw["protocol"]]
    elif "protocol" in raw:
        keys.append("protocol")
    return keys


def _without(raw: dict, keys) -> dict:
    """``raw`` less the dotted ``keys`` (``"protocol.fps"`` removes ``raw["protocol"]["fps"]``)."""
    kept = {key: dict(value) if isinstance(value, dict) else value for key, value in raw.items()}
    for key in keys:
        *sections, last = key.split(".")
        node = kept
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return kept


def check_inputs(config: ExtractionConfig, random_init: bool) -> None:
    """The required settings are given and the files they name exist (with the preset's hint
    of where to get each)."""
    from losa_tal import input_error

    for key in ("videos", "store"):
        if not getattr(config, key):
            raise input_error(FLAGS[key], "required (or use --preset)")
    if not random_init and not config.checkpoint:
        raise input_error(FLAGS["checkpoint"], "give a checkpoint, or --random-init for random "
                          "weights")
    hints = config.download
    if config.checkpoint and not Path(config.checkpoint).is_file():
        raise input_error(config.checkpoint, "checkpoint not found; " + hints.checkpoint)
    if not Path(config.videos).is_dir():
        raise input_error(config.videos, "video folder not found; " + hints.videos)
    if config.annotations and not Path(config.annotations).is_file():
        raise input_error(config.annotations, "annotation file not found; " + hints.annotations)


def _preset_path(name: str) -> Path:
    from losa_tal import input_error

    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.json"))
        raise input_error("--preset", f"no preset {name!r} (known: {', '.join(known)})")
    return path


def _backbone_spec(value: str) -> tuple:
    """``(source, spec)`` of ``--backbone``: a preset name, or the kwargs of a JSON/YAML file
    (then named by its path in messages)."""
    if value.lower().endswith((".json", ".yaml", ".yml")) or os.path.isfile(value):
        return value, read_config_file(value, "expected an object of settings")
    return FLAGS["backbone"], value


def _parse_layers(text: str) -> list:
    from losa_tal import input_error

    text = text.strip().lower()
    if text in ("", "none"):
        return []
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise input_error("--layers", f"expected block indices like 7,15,23,31, got {text!r}") \
            from None


class _rank_group:
    """Under torchrun, a gloo group joining the ranks at the end, so that every rank learns the
    total failure count (and none exits early with an error, which would make torchrun stop the
    others mid-video). Outside torchrun, nothing."""

    def __enter__(self):
        import torch

        import losa_distributed

        # Ranks may finish hours apart: they wait for each other that long.
        self.world = losa_distributed.start(torch.device("cpu"), timeout_minutes=7 * 24 * 60)
        return self.total

    def total(self, count: int) -> int:
        import torch

        import losa_distributed

        return int(losa_distributed.sum_across(self.world, torch.tensor([count])).item())

    def __exit__(self, *exc):
        import losa_distributed

        losa_distributed.stop(self.world)
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
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def check(ctx, folder, annotations, subset, json_out, preset, probe_clips, quiet,
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
    from losa_tal import input_error

    if annotations and not Path(annotations).is_file():
        raise input_error(annotations, "annotation file not found")
    if probe_clips < 1:
        raise input_error("--clips", "must be positive")
    durations = annotated_durations(annotations, subset) if annotations else {}
    found, missing = find_videos(folder, list(durations) if annotations else None)
    protocol = load_config(preset, dict(flags_by_key(protocol_flags)))[0].protocol
    records = []
    for video_id, path in tqdm(found, unit="video", desc="check", disable=quiet):
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
