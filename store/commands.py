"""``store info | verify | export | import``: click commands (heavy imports inside the functions)."""
import json
import math

import click

from .urls import storage_options_flag

LAYER_HELP = "'last' (default), or an intermediate block index, averaged over its K tokens."


@click.group()
def store():
    """Inspect, check, export and import feature stores."""


@store.command()
@click.argument("path", metavar="STORE")
@click.option("--json", "as_json", is_flag=True, help="Print everything as one JSON object.")
@storage_options_flag
def info(path, as_json, storage_options):
    """The store's metadata, and per complete video its clips, fps and duration."""
    from .feature_store import FeatureStore

    with FeatureStore.open(path, storage_options) as fs:
        videos = {vid: _video_summary(fs.video_info(vid)) for vid in fs.videos()}
        summary = {"path": fs.path, "format": fs.format, "meta": fs.meta,
                   "num_videos": len(videos),
                   "num_clips": sum(video["num_clips"] for video in videos.values()),
                   "incomplete_videos": fs.incomplete_videos(), "videos": videos}
    if as_json:
        click.echo(json.dumps(summary, indent=1))
    else:
        click.echo(_format_info(summary))


def _video_summary(info: dict) -> dict:
    return {key: info.get(key) for key in ("num_clips", "fps", "duration", "float32_layers")}


def _format_info(summary: dict) -> str:
    meta = summary["meta"]
    backbone = meta["backbone"]
    checkpoint = backbone.get("checkpoint") or {}
    protocol = meta["protocol"]
    lines = [
        f"store     {summary['path']} ({summary['format']}, format {meta['format_version']}, "
        f"written by losa-tal {meta.get('software_version')} on {meta.get('created')})",
        f"backbone  {backbone.get('preset') or 'custom'}"
        + (f", checkpoint {checkpoint.get('file')} sha256 {str(checkpoint.get('sha256'))[:12]}"
           if checkpoint else "")
        + (f", random init seed {backbone['random_init_seed']}"
           if backbone.get("random_init_seed") is not None else ""),
        "protocol  " + ", ".join(f"{key} {value}" for key, value in protocol.items()),
        f"layers    last + {meta['layers']}, tokens {meta['tokens']}, feature_dim "
        f"{meta['feature_dim']}, {meta['dtype']}",
        f"videos    {summary['num_videos']} complete, {summary['num_clips']} clips"
        + (f", {len(summary['incomplete_videos'])} incomplete (ignored)"
           if summary["incomplete_videos"] else ""),
    ]
    if summary["videos"]:
        # An id with a newline or other control character is shown escaped: one row per video.
        shown = {vid: vid if vid.isprintable() else repr(vid) for vid in summary["videos"]}
        width = max(len(name) for name in shown.values())
        lines.append(f"  {'video':<{width}}  {'clips':>7}  {'fps':>7}  {'duration':>9}")
        for vid, video in summary["videos"].items():
            fps = "-" if video["fps"] is None else f"{video['fps']:.3f}"
            duration = "-" if video["duration"] is None else f"{video['duration']:.2f}s"
            lines.append(f"  {shown[vid]:<{width}}  {video['num_clips']:>7}  {fps:>7}  "
                         f"{duration:>9}")
    return "\n".join(lines)


@store.command()
@click.argument("path", metavar="STORE")
@storage_options_flag
@click.option("--quiet", is_flag=True, help="No progress bar.")
def verify(path, storage_options, quiet):
    """Read every complete video through every check; exit 1 naming each bad one."""
    from .feature_store import FeatureStore
    from .verify import verify_store

    with FeatureStore.open(path, storage_options) as fs:
        report = verify_store(fs, progress=not quiet)
    for note in report.notes:
        click.echo(f"note: {note}")
    for vid, problem in report.bad.items():
        click.echo(f"bad: {vid}: {problem}")
    for vid, reason in report.failed.items():
        click.echo(f"failed: {vid}: its source could not be extracted ({reason})")
    for vid in report.missing:
        why = f"{report.partial[vid]}; run extract again" if vid in report.partial else \
            "planned, not committed"
        click.echo(f"missing: {vid}: {why}")
    click.echo(f"{report.checked} video(s) checked, {len(report.bad)} bad"
               + (f", {len(report.missing)} planned but missing" if report.missing else "")
               + (f", {len(report.failed)} failed at extraction" if report.failed else ""))
    if not report.clean:
        click.get_current_context().exit(1)


@store.command()
@click.argument("path", metavar="STORE")
@click.option("--older-than", default="24h", show_default=True, metavar="AGE",
              help="Only what nothing has written for this long (s, m, h or d): a younger "
                   "attempt may belong to a writer that is still running.")
@click.option("--delete", is_flag=True, help="Delete what is listed (default: only list it).")
@storage_options_flag
def gc(path, older_than, delete, storage_options):
    """List (or --delete) what dead or losing writers left: attempts no commit uses."""
    from .feature_store import FeatureStore

    seconds = parse_age(older_than)
    with FeatureStore.open(path, storage_options, writable=True) as fs:
        found = fs.leftovers(seconds)
        for relative, age in found:
            if delete:
                fs.remove_leftover(relative)
            click.echo(f"{'removed' if delete else 'would remove'}: {relative} "
                       f"(untouched for {age / 3600:.1f} h)")
    verb = "removed" if delete else "found (run with --delete to remove them)"
    click.echo(f"{len(found)} leftover(s) older than {older_than} {verb}")


@store.command()
@click.argument("path", metavar="STORE")
@storage_options_flag
def upgrade(path, storage_options):
    """Turn a format-1 Zarr store into format 2 in place (run it while no writer runs)."""
    from .feature_store import FeatureStore

    count = FeatureStore.upgrade(path, storage_options)
    click.echo(f"{path}: format 2, {count} video(s) carried over" if count is not None
               else f"{path}: already format 2")


AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_age(text: str) -> float:
    """``90s``, ``30m``, ``24h``, ``2d`` as seconds; a one-line error otherwise."""
    from losa_tal import InputError

    number, unit = text[:-1], text[-1:]
    try:
        seconds = float(number) * AGE_UNITS[unit]
    except (KeyError, ValueError):
        raise InputError(f"--older-than: expected a number and s, m, h or d (e.g. 24h), "
                         f"got {text!r}") from None
    if not (math.isfinite(seconds) and seconds >= 0):
        raise InputError(f"--older-than: must be a finite age, got {text!r}")
    return seconds


@store.command()
@click.argument("path", metavar="STORE")
@click.option("--out", required=True, metavar="DIR", help="Directory for one .npy per video.")
@click.option("--layer", default="last", show_default=True, help=LAYER_HELP)
@storage_options_flag
def export(path, out, layer, storage_options):
    """One float32 [T, D] .npy per video, as ActionFormer and OpenTAD read them."""
    from losa_tal import InputError

    from .feature_store import FeatureStore
    from .meta import LAST
    from .transfer import export_features

    if layer != LAST:
        try:
            layer = int(layer)
        except ValueError:
            raise InputError(f"--layer: expected 'last' or a block index, got {layer!r}") from None
    with FeatureStore.open(path, storage_options) as fs:
        count = export_features(fs, out, layer, progress=True)
    click.echo(f"wrote {count} file(s) to {out}")


@store.command("import")
@click.argument("directory", metavar="DIR")
@click.option("--out", required=True, metavar="STORE", help="Store to create or append to.")
@click.option("--fps", type=float, default=None,
              help="Frame rate of every video (unless --annotations gives it per video).")
@click.option("--clip-len", type=int, default=16, show_default=True, help="Frames per clip.")
@click.option("--clip-stride", type=int, default=4, show_default=True,
              help="Frames between consecutive clips.")
@click.option("--frame-interval", type=int, default=1, show_default=True,
              help="Step between the frames inside a clip.")
@click.option("--annotations", default=None, metavar="JSON",
              help="Annotation file giving each video's fps (or frame count and duration).")
@click.option("--backbone", default=None, help="Backbone name to record, e.g. vit_g.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32",
              show_default=True, help="Storage precision (float32 keeps the files exactly).")
@click.option("--format", "store_format", type=click.Choice(["zarr", "hdf5"]), default=None,
              help="Store format (default: an existing store's, else zarr; .h5 means hdf5).")
@storage_options_flag
def import_(directory, out, fps, clip_len, clip_stride, frame_interval, annotations, backbone,
            dtype, store_format, storage_options):
    """Make a last-layer-only store from [T, D] .npy files (e.g. published VideoMAEv2 features)."""
    from losa_tal import ConfigError, InputError, flag_errors

    from .transfer import import_features

    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise InputError(f"--fps: must be a positive number, got {fps}")
    try:
        with flag_errors({"fps": "--fps", "annotations": "--annotations", "format": "--format"}):
            imported, skipped = import_features(
                directory, out, fps=fps, clip_len=clip_len, clip_stride=clip_stride,
                frame_interval=frame_interval, annotations=annotations, format=store_format,
                dtype=dtype, backbone=backbone, progress=True, storage_options=storage_options)
    except ConfigError as err:  # a protocol field, set by the flag of its name
        raise InputError(f"--{err.key.replace('_', '-')}: protocol {err.key}: {err.problem}") \
            from None
    click.echo(f"imported {imported} video(s) into {out}; {skipped} already there")
