"""``synth`` and ``demo``: the click commands of the synthetic benchmark (heavy imports inside)."""
from dataclasses import fields

import click

from losa_tal import flag_errors
from synth.config import SynthConfig  # a plain dataclass: no numpy behind it

_DEFAULT = SynthConfig()
# Every SynthConfig field is an option of both commands: a field's problem names its flag.
SYNTH_FLAGS = {f.name: "--" + f.name.replace("_", "-") for f in fields(SynthConfig)}


def _benchmark_options(function):
    """The options that shape the benchmark, shared by ``synth`` and ``demo``."""
    options = [
        click.option("--videos", type=int, default=_DEFAULT.videos, show_default=True,
                     help="Number of videos (the last quarter forms the test subset)."),
        click.option("--seed", type=int, default=_DEFAULT.seed, show_default=True,
                     help="Benchmark seed: the same seed writes the same bytes."),
        click.option("--size", type=int, default=_DEFAULT.size, show_default=True,
                     help="Frame side in pixels (a multiple of 16)."),
        click.option("--fps", type=int, default=_DEFAULT.fps, show_default=True,
                     help="Frame rate."),
        click.option("--min-seconds", type=float, default=_DEFAULT.min_seconds,
                     show_default=True, help="Shortest video."),
        click.option("--max-seconds", type=float, default=_DEFAULT.max_seconds,
                     show_default=True, help="Longest video."),
        click.option("--test-fraction", type=float, default=_DEFAULT.test_fraction,
                     show_default=True, help="Share of the videos in the test subset."),
        click.option("--context/--no-context", default=_DEFAULT.context, show_default=True,
                     help="Add the global-context classes (shakes labelled by a cue elsewhere "
                     "in the video; docs/synth.md)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _synth_config(**values):
    config = SynthConfig(**values)
    with flag_errors(SYNTH_FLAGS):
        config.check()
    return config


@click.command()
@click.option("--out", required=True, help="Folder to write videos/ and annotations.json into.")
@_benchmark_options
@click.option("--quiet", is_flag=True, help="No progress bar.")
def synth(out, quiet, **values):
    """Write the synthetic untrimmed-video benchmark: H.264 videos and ActivityNet-layout
    annotations with train and test subsets (docs/synth.md describes its design)."""
    from synth.generator import generate

    config = _synth_config(**values)
    annotations = generate(out, config, progress=not quiet)
    database = annotations["database"]
    actions = sum(len(video["annotations"]) for video in database.values())
    click.echo(f"wrote {len(database)} videos with {actions} actions to {out}")


@click.command()
@click.option("--out", default="demo_out", show_default=True,
              help="Output folder (a previous demo's output there is replaced).")
@_benchmark_options
@click.option("--checkpoint", help="VideoMAEv2 checkpoint for the demo backbone (its "
              "constructor arguments must match); default: random weights from --seed.")
@click.option("--epochs", type=int, help="Training epochs of both models (default: the "
              "configs' own, configs/demo/*.json).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(out, checkpoint, epochs, quiet, **values):
    """Run the whole pipeline on the synthetic benchmark: generate, extract, train LoSA and the
    head-only baseline from the same store, infer on the test split, evaluate, and report
    (report.json, report.md, timelines and diagnosis figures in --out)."""
    from losa_tal import input_error
    from synth.demo import DemoSettings, comparison_table, run_demo

    config = _synth_config(**values)
    if epochs is not None and epochs < 1:
        raise input_error("--epochs", f"must be at least 1, got {epochs}")
    settings = DemoSettings(out=out, checkpoint=checkpoint, synth=config,
                            train_overrides=[] if epochs is None else [f"train.epochs={epochs}"],
                            progress=not quiet)
    with flag_errors({"out": "--out"}):
        report = run_demo(settings)
    click.echo(f"\nmAP (%) on the test split, seed {report['seed']}:")
    click.echo(comparison_table(report))
    click.echo("seconds: " + ", ".join(f"{k} {v}" for k, v in report["seconds"].items()))
    click.echo(f"report: {out}/report.md, {out}/report.json")
