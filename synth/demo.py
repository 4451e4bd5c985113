"""The demo: the whole pipeline on the synthetic benchmark, LoSA against head-only, in minutes.

    generate videos --> extract a small random-weight VideoMAEv2 into one store
      --> train LoSA and head-only from that store (same head, schedule and seed)
      --> infer on the test split --> mAP, diagnosis and a timeline per model --> report

Both models read the same store with the same config except ``model.type``, so the only
difference between them is the adapters. Everything lands in one output folder; a rerun
replaces a previous demo's output, and refuses a folder that holds anything else.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from losa_tal import InputError, input_error, output_errors, shipped_configs, write_output
from synth.generator import ANNOTATION_FILE, VIDEO_DIR, SynthConfig, generate

TRAIN_CONFIG = shipped_configs() / "demo" / "train.json"
MODELS = ("losa", "head_only")
# The store's settings: the extraction preset "synth" (configs/datasets/synth.json), so that
# `losa-tal extract --preset synth` makes the same store. A small VideoMAEv2 for 64-pixel
# videos (4 blocks of width 128 on 8x4x4 tokens per clip); LoSA adapts blocks 1 and 2, each clip
# keeping early/late x 2x2 quadrants of them.
DEMO_EXTRACTION = "synth"
REPORT_FILE = "report.json"
BENCHMARK_DIR = "benchmark"
STORE_DIR = "features.zarr"


@dataclass
class DemoSettings:
    out: str = "demo_out"
    checkpoint: str | None = None
    synth: SynthConfig = field(default_factory=SynthConfig)  # its seed also seeds the random
    # backbone weights and both trainings
    train_overrides: list = field(default_factory=list)  # "key.sub=value", for both models
    progress: bool = True


def run_demo(settings: DemoSettings) -> dict:
    """Run the demo into ``settings.out``; returns the report (also written as report.json)."""
    import torch

    out = Path(settings.out)
    settings.synth.check()
    if settings.checkpoint is not None:
        check_checkpoint(settings.checkpoint)
    _claim_output(out)
    # One thread: the demo's tensors are small, and on a busy 2-core machine two torch threads
    # spin-wait for each other (training took 10x longer with two, measured).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_stages(settings, out)
    finally:
        torch.set_num_threads(threads)


def _run_stages(settings: DemoSettings, out: Path) -> dict:
    seconds = {}
    with _timed(seconds, "synth"):
        benchmark = out / BENCHMARK_DIR
        generate(str(benchmark), settings.synth, progress=settings.progress)
        annotations = benchmark / ANNOTATION_FILE
    with _timed(seconds, "extract"):
        store = out / STORE_DIR
        extract_benchmark(benchmark, store, settings)
    with _timed(seconds, "train"):
        train_both(store, annotations, out, settings)
    with _timed(seconds, "evaluate"):
        results = {model: evaluate_model(model, store, annotations, out, settings)
                   for model in MODELS}
        plot_sensitivity_side_by_side(out)
    report = {"seed": settings.synth.seed,
              **{model: {"mAP": r["mAP"], "average_mAP": r["average_mAP"],
                         "tiou_thresholds": r["tiou_thresholds"]}
                 for model, r in results.items()},
              "seconds": {k: round(v, 1) for k, v in seconds.items()},
              **{key: getattr(demo_extraction(), key) for key in ("backbone", "layers", "tokens")},
              "checkpoint": settings.checkpoint, "synth": vars(settings.synth)}
    _write_text(out / REPORT_FILE, json.dumps(report, indent=1))
    _write_text(out / "report.md", report_markdown(report, results))
    return report


# -- the stages ----------------------------------------------------------------------------------


def check_checkpoint(path) -> None:
    """Refuse, before anything runs, a checkpoint that does not fit the demo backbone."""
    from extract.backbone import build_backbone, load_checkpoint

    if not Path(path).is_file():
        raise input_error(path, "checkpoint file not found")
    load_checkpoint(build_backbone(demo_extraction().backbone, source="demo backbone"), path)


def demo_extraction():
    """The demo store's extraction settings (the preset ``DEMO_EXTRACTION``)."""
    from extract.config import load_preset

    return load_preset(DEMO_EXTRACTION)


def extract_benchmark(benchmark: Path, store: Path, settings: DemoSettings):
    from dataclasses import replace

    from extract.pipeline import ExtractionSettings, run_extraction

    database = json.loads((benchmark / ANNOTATION_FILE).read_text())["database"]
    videos = [(vid, str(benchmark / VIDEO_DIR / f"{vid}.mp4")) for vid in sorted(database)]
    extraction = ExtractionSettings(replace(
        demo_extraction(), store=str(store), checkpoint=settings.checkpoint,
        random_init=settings.checkpoint is None, seed=settings.synth.seed),
        videos=videos, backbone_source="demo backbone")
    summary = run_extraction(extraction, show_progress=settings.progress)
    if summary.failed:
        video, reason = next(iter(summary.failed.items()))
        raise input_error(benchmark / VIDEO_DIR / f"{video}.mp4", f"could not extract: {reason}")
    return summary


def train_both(store: Path, annotations: Path, out: Path, settings: DemoSettings) -> None:
    """Train both models at once, one process and one torch thread each.

    The two runs are independent and single-threaded (see ``run_demo``), so on a 2-core machine
    running them side by side halves the demo's longest stage. Each child writes its own run
    directory; one progress bar follows the epochs both have logged.
    """
    runs = {model: out / "runs" / model for model in MODELS}
    jobs = {model: (train_model, (model, store, annotations, runs[model], settings))
            for model in MODELS}
    if not settings.progress:
        run_side_by_side(jobs)
        return
    from tqdm import tqdm

    epochs = demo_config(MODELS[0], settings).train.epochs
    with tqdm(total=epochs * len(MODELS), desc="train " + " + ".join(MODELS),
              unit="epoch") as bar:
        def follow_epochs():
            bar.update(sum(_logged_epochs(run) for run in runs.values()) - bar.n)

        run_side_by_side(jobs, on_tick=follow_epochs)
        follow_epochs()


def run_side_by_side(jobs: dict, on_tick=None, tick_seconds: float = 0.5) -> None:
    """Run each ``name: (function, args)`` in a spawned process; return when all have finished.

    The first failure stops the others at once and is raised here: a child's exception as
    itself (its traceback printed by the child), a child that died without a word (killed, out
    of memory) as a RuntimeError naming the job. ``on_tick`` is called every ``tick_seconds``.
    """
    from extract.workers import SpawnContext

    # spawn, not fork: a forked child would inherit torch's thread pool in an unknown state;
    # and children that die with this process, however it dies (extract/workers.py).
    context = SpawnContext()
    children = {}
    try:
        for name, (function, args) in jobs.items():
            receive, send = context.Pipe(duplex=False)
            process = context.Process(target=_report_outcome, args=(send, function, args),
                                      name=name, daemon=True)
            process.start()
            send.close()  # the child holds the only sending end: its exit reads as EOF here
            children[name] = (process, receive)
        pending = dict(children)
        while pending:
            for name, (process, receive) in list(pending.items()):
                if receive.poll():
                    _raise_child_error(name, process, receive)
                    del pending[name]
            if on_tick is not None:
                on_tick()
            if pending:
                time.sleep(tick_seconds)
    finally:
        for process, _ in children.values():
            if process.is_alive():
                process.terminate()
            process.join()


def _report_outcome(send, function, args) -> None:
    """In the child: run the job, then send None or the exception it raised."""
    import traceback

    try:
        function(*args)
        outcome = None
    except BaseException as err:  # noqa: BLE001 - everything goes back to the parent
        if not isinstance(err, InputError):
            traceback.print_exc()  # the parent re-raises without the child's stack
        outcome = err
    try:
        send.send(outcome)
    except Exception:  # an exception that does not pickle still reaches the parent, as text
        send.send(RuntimeError(repr(outcome)))


def _raise_child_error(name: str, process, receive) -> None:
    try:
        error = receive.recv()
    except EOFError:
        process.join()
        raise RuntimeError(f"{name}: the process died (exit code {process.exitcode})") from None
    if error is not None:
        raise error


def train_model(model: str, store: Path, annotations: Path, run_dir: Path,
                settings: DemoSettings):
    import torch

    from training.train import train

    torch.set_num_threads(1)
    return train(demo_config(model, settings), str(store), str(annotations), str(run_dir),
                 progress=False)


def demo_config(model: str, settings: DemoSettings):
    """One config for both models: the model type is the only difference between the runs."""
    from training.config import load_config

    overrides = [f"model.type={model}", f"train.seed={settings.synth.seed}",
                 *settings.train_overrides]
    return load_config(TRAIN_CONFIG, overrides)


def _logged_epochs(run_dir: Path) -> int:
    try:
        return (run_dir / "log.jsonl").read_text().count('"event": "epoch"')
    except OSError:  # not started yet
        return 0


def evaluate_model(model: str, store: Path, annotations: Path, out: Path,
                   settings: DemoSettings) -> dict:
    """Predict the test split, score it, and draw the diagnosis and one timeline."""
    from evaluation import (diagnose, evaluate_detections, load_annotations, plot_timeline,
                            write_diagnosis)
    from training.infer import infer

    model_dir = out / model
    predictions_path = model_dir / "predictions.json"
    model_dir.mkdir(parents=True, exist_ok=True)
    predictions = infer(str(out / "runs" / model), str(store), str(annotations), subset="test",
                        out_path=str(predictions_path), device="cpu",
                        progress=settings.progress)
    ground_truth = load_annotations(str(annotations))
    evaluation = evaluate_detections(ground_truth, predictions, subset="test")
    write_diagnosis(diagnose(evaluation), model_dir / "diagnosis")
    video = timeline_video(ground_truth)
    plot_timeline(ground_truth, predictions, video, model_dir / "timeline.png",
                  video_file=out / BENCHMARK_DIR / VIDEO_DIR / f"{video}.mp4")
    return evaluation.report()


def plot_sensitivity_side_by_side(out: Path) -> str:
    """The paper's sensitivity comparison: both models in one figure (sensitivity.png)."""
    from evaluation.diagnosis import plot_sensitivity_comparison

    diagnoses = {model: [json.loads((out / model / "diagnosis" / "diagnosis.json").read_text())
                         ["sensitivity"]] for model in MODELS}
    return plot_sensitivity_comparison(diagnoses, out / "sensitivity.png")


def timeline_video(ground_truth) -> str:
    """The test video with the most actions: the busiest timeline to look at."""
    videos = ground_truth.videos("test")
    return max(sorted(videos), key=lambda vid: len(videos[vid].labels))


# -- the report ----------------------------------------------------------------------------------


def comparison_table(report: dict) -> str:
    """Plain-text side-by-side table: mAP (%) per tIoU and average, one row per model."""
    thresholds = report["losa"]["tiou_thresholds"]
    header = "model".ljust(11) + "".join(f"{t:>8.2g}" for t in thresholds) + f"{'average':>9}"
    rows = [header]
    for model in MODELS:
        values = report[model]["mAP"]
        rows.append(model.ljust(11) + "".join(f"{100 * v:8.2f}" for v in values)
                    + f"{100 * report[model]['average_mAP']:9.2f}")
    return "\n".join(rows)


def report_markdown(report: dict, results: dict) -> str:
    thresholds = report["losa"]["tiou_thresholds"]
    lines = [f"# LoSA-TAL demo (seed {report['seed']})", "",
             "mAP (%) on the synthetic benchmark's test split.", "",
             "| model | " + " | ".join(f"tIoU {t:.2g}" for t in thresholds) + " | average |",
             "|---" * (len(thresholds) + 2) + "|"]
    for model in MODELS:
        cells = [f"{100 * v:.2f}" for v in report[model]["mAP"]]
        lines.append(f"| {model} | " + " | ".join(cells)
                     + f" | {100 * report[model]['average_mAP']:.2f} |")
    classes = list(results["losa"]["per_class_AP"])
    lines += ["", "AP (%) per class, averaged over tIoU:", "",
              "| class | " + " | ".join(MODELS) + " |", "|---|---|---|"]
    for label in classes:
        cells = [f"{100 * sum(ap) / len(ap):.2f}"
                 for ap in (results[m]["per_class_AP"][label] for m in MODELS)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Seconds: " + ", ".join(f"{k} {v}" for k, v in report["seconds"].items()), "",
              "Normalised mAP by action length and by instances per video, both models:", "",
              "![sensitivity](sensitivity.png)", ""]
    for model in MODELS:
        lines += [f"## {model}", "", f"![timeline]({model}/timeline.png)",
                  f"![false positives]({model}/diagnosis/false_positives.png)",
                  f"![sensitivity]({model}/diagnosis/sensitivity.png)", ""]
    return "\n".join(lines)


# -- helpers -------------------------------------------------------------------------------------


class _timed:
    """Adds the seconds spent inside the ``with`` block to ``seconds[name]``."""

    def __init__(self, seconds: dict, name: str):
        self.seconds, self.name = seconds, name

    def __enter__(self):
        self.started = time.perf_counter()

    def __exit__(self, *exc):
        self.seconds[self.name] = self.seconds.get(self.name, 0.0) + \
            time.perf_counter() - self.started
        return False


def _claim_output(out: Path) -> None:
    """Start from an empty folder: a previous demo's output is replaced; anything else is
    refused, so the demo never deletes files it did not write."""
    if out.exists() and not out.is_dir():
        raise input_error(out, "exists and is not a folder; choose another `out`")
    if out.is_dir() and any(out.iterdir()):
        if not _is_demo_output(out):
            raise input_error(out, "folder is not empty and holds no demo output; choose "
                              "another `out`")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_text(out / ".losa-demo", "written by `cli.py demo`; rerunning the demo replaces "
                "this folder\n")


def _is_demo_output(out: Path) -> bool:
    return (out / ".losa-demo").is_file()


def _write_text(path: Path, text: str) -> None:
    """Write through ``losa_tal.open_output``, so an interrupted run never leaves half a report."""
    with output_errors(path):
        write_output(path, text)
