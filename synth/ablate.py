"""The ablation: does each part of LoSA earn its place? (``python bench/ablate.py``)

From one store of the synthetic benchmark, train each variant below over several training seeds,
with the demo's head, schedule and data (configs/demo/train.json; the variant's overrides are
the only difference), and score each on the test split:

    head_only    the baseline: last-layer features only
    short        LoSA with its short-range adapters only
    long         LoSA with its long-range adapters only
    losa         both (LoSA as the demo trains it)
    losa_gates   both, with the zero-gates start (``model.losa.zero_init: "gates"``)
    losa_relpos  both, the long-range adapter redesigned: a band of 61 clips (the 8 s a flash
                 may precede its dash, either side) with a learned bias per offset, so that it
                 can tell *before* from *after* (docs/losa.md, "the long-range question")

The benchmark holds the global-context classes (``SynthConfig.context``; bench/ablate.py's
``--no-context`` leaves them out), named in ``summary.json`` under ``context_classes``.

Every finished run writes ``runs/<variant>/seed<S>/result.json`` at once, so an interrupted
ablation resumes where it stopped (same settings) and a partial one still tabulates what
finished. The table (mean and spread of average mAP over seeds, AP per class) is printed and
written as ``table.md``; ``ablation.png`` draws it with error bars, and ``sensitivity.png`` sets
LoSA against head-only by action length and instances per video, averaged over the seeds.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from losa_tal import ConfigError, input_error, write_output
from synth.config import SynthConfig

VARIANTS = {
    "head_only": ["model.type=head_only"],
    "short": ["model.losa.adapters=short"],
    "long": ["model.losa.adapters=long"],
    "losa": [],
    "losa_gates": ["model.losa.zero_init=gates"],
    "losa_relpos": ["model.losa.long_window=61", "model.losa.long_relative_bias=true"],
}
SETTINGS_FILE = "settings.json"
RESULT_FILE = "result.json"
# The quick mode that the test runs: a few short videos, one seed, two epochs.
QUICK_SYNTH = dict(videos=6, min_seconds=10.0, max_seconds=12.0)
QUICK_EPOCHS = 2


@dataclass
class AblationSettings:
    out: str = "ablate_out"
    synth: SynthConfig = field(default_factory=SynthConfig)  # the one benchmark and store
    train_seeds: tuple = (0, 1, 2, 3, 4)
    variants: tuple = tuple(VARIANTS)
    epochs: int | None = None  # None: the demo config's own
    progress: bool = True

    def identity(self) -> dict:
        """What a resumed ablation must share with the one that wrote the folder."""
        return {"synth": asdict(self.synth), "epochs": self.epochs}


def run_ablation(settings: AblationSettings) -> dict:
    """Train and score every pending (variant, seed); return the summary (also written)."""
    from synth.demo import STORE_DIR

    out = Path(settings.out)
    for variant in settings.variants:
        if variant not in VARIANTS:
            raise ConfigError("variants", f"unknown variant {variant!r}; choose from "
                              + ", ".join(VARIANTS))
    settings.synth.check()
    _claim_output(out, settings)
    store = out / STORE_DIR
    if not (out / "store.done").is_file():
        _build_store(out, settings)
    pending = [(v, s) for s in settings.train_seeds for v in settings.variants
               if not (_run_dir(out, v, s) / RESULT_FILE).is_file()]
    _train_pending(pending, store, out, settings)
    summary = summarise(collect_results(out, settings.variants, settings.train_seeds))
    _write_outputs(out, summary, context_classes(out))
    return summary


def context_classes(out: Path) -> list:
    """The benchmark's global-context classes, from its own metadata."""
    from synth.demo import BENCHMARK_DIR
    from synth.generator import ANNOTATION_FILE

    return json.loads((out / BENCHMARK_DIR / ANNOTATION_FILE).read_text())["context_classes"]


def _build_store(out: Path, settings: AblationSettings) -> None:
    from synth.demo import BENCHMARK_DIR, STORE_DIR, DemoSettings, extract_benchmark
    from synth.generator import generate

    generate(str(out / BENCHMARK_DIR), settings.synth, progress=settings.progress)
    demo = DemoSettings(out=str(out), synth=settings.synth, progress=settings.progress)
    extract_benchmark(out / BENCHMARK_DIR, out / STORE_DIR, demo)
    write_output(out / "store.done", "")


def _train_pending(pending, store: Path, out: Path, settings: AblationSettings) -> None:
    """Two runs at a time, one process and one torch thread each (the demo's two cores)."""
    from synth.demo import run_side_by_side

    iterator = range(0, len(pending), 2)
    if settings.progress:
        from tqdm import tqdm
        iterator = tqdm(iterator, desc=f"ablation ({len(pending)} runs)", unit="pair")
    for first in iterator:
        jobs = {f"{v} seed {s}": (train_and_score, (v, s, store, out, settings.epochs))
                for v, s in pending[first:first + 2]}
        run_side_by_side(jobs)


def _run_dir(out: Path, variant: str, seed: int) -> Path:
    return out / "runs" / variant / f"seed{seed}"


def variant_config(variant: str, seed: int, epochs: int | None):
    """The demo's config with the variant's overrides: nothing else differs between runs."""
    from synth.demo import TRAIN_CONFIG
    from training.config import load_config

    overrides = [*VARIANTS[variant], f"train.seed={seed}"]
    if epochs is not None:
        overrides.append(f"train.epochs={epochs}")
    return load_config(TRAIN_CONFIG, overrides)


def train_and_score(variant: str, seed: int, store: Path, out: Path, epochs) -> dict:
    """In a child process: train one run, predict the test split, write its result.json."""
    import time

    import torch

    from evaluation import diagnose, evaluate_detections, load_annotations
    from synth.demo import BENCHMARK_DIR, _write_text
    from synth.generator import ANNOTATION_FILE
    from training.infer import infer
    from training.train import train

    torch.set_num_threads(1)
    run_dir = _run_dir(out, variant, seed)
    if (run_dir / RESULT_FILE).is_file():  # another ablation process on this folder got there
        return json.loads((run_dir / RESULT_FILE).read_text())
    annotations = out / BENCHMARK_DIR / ANNOTATION_FILE
    started = time.perf_counter()
    train(variant_config(variant, seed, epochs), str(store), str(annotations), str(run_dir),
          progress=False)
    seconds = time.perf_counter() - started
    predictions = infer(str(run_dir), str(store), str(annotations), subset="test",
                        out_path=str(run_dir / "predictions.json"), device="cpu",
                        progress=False)
    truth = load_annotations(str(annotations))
    evaluation = evaluate_detections(truth, predictions, subset="test")
    report = evaluation.report()
    context = context_classes(out)
    result = {"variant": variant, "seed": seed, "average_mAP": report["average_mAP"],
              "mAP": report["mAP"], "tiou_thresholds": report["tiou_thresholds"],
              "per_class_AP": {label: sum(ap) / len(ap)
                               for label, ap in report["per_class_AP"].items()},
              "sensitivity": diagnose(evaluation)["sensitivity"],
              "family_AP": family_ap(truth, predictions, context),
              "train_seconds": round(seconds, 1)}
    _write_text(run_dir / RESULT_FILE, json.dumps(result, indent=1))
    return result


def family_ap(annotations, predictions: dict, family: list) -> float | None:
    """AP (mean over the tIoU thresholds) of the ``family`` classes taken as one class, from
    parsed ``annotations``: whether their actions are found at all, whatever label they get
    (None without test actions). The gap between it and the AP of each member is what telling
    the members apart costs."""
    from evaluation import evaluate_detections

    if not family:
        return None
    merged = "|".join(family)
    one = lambda label: merged if label in family else label  # noqa: E731
    truth = annotations.select(list(annotations.videos("test")), relabel=one)
    results = {video: _merged(detections, one) for video, detections in
               predictions["results"].items()}
    report = evaluate_detections(truth, {"results": results}, subset="test").report()
    if merged not in report["per_class_AP"]:  # no member in the test split
        return None
    return sum(report["per_class_AP"][merged]) / len(report["per_class_AP"][merged])


def _merged(detections: list, one) -> list:
    """Detections relabelled by ``one``; of those that then share a segment and label (a head
    scores every class on each candidate segment), the best only, as one class would give."""
    best = {}
    for d in detections:
        key = (tuple(d["segment"]), one(d["label"]))
        if key not in best or d["score"] > best[key]["score"]:
            best[key] = {**d, "label": key[1]}
    return list(best.values())


def collect_results(out: Path, variants, seeds) -> dict:
    """{variant: [result, ...]} of the runs that finished, in seed order."""
    results = {}
    for variant in variants:
        found = [_run_dir(out, variant, s) / RESULT_FILE for s in seeds]
        results[variant] = [json.loads(p.read_text()) for p in found if p.is_file()]
    return results


def summarise(results: dict) -> dict:
    """Mean and spread (sample standard deviation) over seeds, per variant."""
    import numpy as np

    summary = {}
    for variant, runs in results.items():
        if not runs:
            continue
        scores = np.array([r["average_mAP"] for r in runs])
        classes = list(runs[0]["per_class_AP"])
        per_class = np.array([[r["per_class_AP"][c] for c in classes] for r in runs])
        spread = lambda x: x.std(axis=0, ddof=1) if len(runs) > 1 else 0 * x[0]  # noqa: E731
        summary[variant] = {
            "seeds": [r["seed"] for r in runs], "average_mAP": scores.tolist(),
            "mean": float(scores.mean()), "std": float(spread(scores)),
            "per_class_mean": dict(zip(classes, per_class.mean(axis=0).tolist())),
            "per_class_std": dict(zip(classes, np.atleast_1d(spread(per_class)).tolist())),
            "train_seconds": float(np.mean([r["train_seconds"] for r in runs])),
            "sensitivity": [r["sensitivity"] for r in runs],
        }
        family = [r.get("family_AP") for r in runs]
        if all(ap is not None for ap in family):
            family = np.array(family)
            summary[variant].update(family_mean=float(family.mean()),
                                    family_std=float(spread(family)))
    return summary


# -- outputs -------------------------------------------------------------------------------------


def table_markdown(summary: dict) -> str:
    """Average mAP (mean +- std over seeds) and AP per class (mean), one row per variant, in %;
    with the global-context classes, also their family's AP whatever the label (``family_ap``)."""
    first = next(iter(summary.values()))
    classes = list(first["per_class_mean"])
    family = "family_mean" in first
    header = classes + (["context family, any label"] if family else [])
    lines = ["| variant | seeds | average mAP | " + " | ".join(header) + " |",
             "|---" * (len(header) + 3) + "|"]
    for variant, s in summary.items():
        cells = [f"{100 * s['per_class_mean'][c]:.1f}" for c in classes]
        if family:
            cells.append(f"{100 * s['family_mean']:.1f} +- {100 * s['family_std']:.1f}")
        lines.append(f"| {variant} | {len(s['seeds'])} | {100 * s['mean']:.1f} +- "
                     f"{100 * s['std']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write_outputs(out: Path, summary: dict, context: list) -> None:
    from synth.demo import _write_text

    if not summary:
        return
    slim = {v: {k: x for k, x in s.items() if k != "sensitivity"} for v, s in summary.items()}
    _write_text(out / "summary.json", json.dumps({"context_classes": context, "variants": slim},
                                                 indent=1))
    _write_text(out / "table.md", table_markdown(summary) + "\n")
    plot_ablation(summary, out / "ablation.png")
    compared = {v: summary[v]["sensitivity"] for v in ("losa", "head_only") if v in summary}
    if compared:
        from evaluation.diagnosis import plot_sensitivity_comparison
        plot_sensitivity_comparison(compared, out / "sensitivity.png")


def plot_ablation(summary: dict, path) -> str:
    """Left: average mAP per variant, mean +- std with each seed as a dot. Right: AP per class."""
    import numpy as np

    from evaluation.plots import new_figure, save_figure

    variants = list(summary)
    classes = list(summary[variants[0]]["per_class_mean"])
    figure = new_figure(13, 4)
    left, right = figure.subplots(1, 2, width_ratios=[2, 5])
    x = np.arange(len(variants))
    left.bar(x, [100 * summary[v]["mean"] for v in variants],
             yerr=[100 * summary[v]["std"] for v in variants], capsize=4, color="tab:blue")
    for i, v in enumerate(variants):
        left.scatter([i] * len(summary[v]["average_mAP"]),
                     [100 * a for a in summary[v]["average_mAP"]], color="black", s=8, zorder=3)
    left.set_xticks(x, variants, rotation=20, fontsize=8)
    left.set_ylabel("average mAP (%), tIoU 0.3:0.7")
    left.set_title("mean +- std over training seeds (dots: seeds)", fontsize=9)
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        right.bar(np.arange(len(classes)) + (i - (len(variants) - 1) / 2) * width,
                  [100 * summary[v]["per_class_mean"][c] for c in classes], width,
                  yerr=[100 * summary[v]["per_class_std"][c] for c in classes], capsize=2,
                  label=v)
    right.set_xticks(np.arange(len(classes)), classes, rotation=15, fontsize=8)
    right.set_ylabel("AP (%), averaged over tIoU")
    right.legend(fontsize=7)
    figure.suptitle("Ablation on the synthetic benchmark")
    return save_figure(figure, path)


def _claim_output(out: Path, settings: AblationSettings) -> None:
    """A new folder, or one an ablation with the same benchmark and epochs wrote (resume)."""
    from synth.demo import _write_text

    marker = out / SETTINGS_FILE
    if marker.is_file():
        if json.loads(marker.read_text()) != settings.identity():
            raise input_error(out, "holds an ablation with other settings (benchmark or "
                              "epochs); choose another `out` or delete it")
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise input_error(out, "exists and holds no ablation; choose another `out`")
    out.mkdir(parents=True, exist_ok=True)
    _write_text(marker, json.dumps(settings.identity(), indent=1))
