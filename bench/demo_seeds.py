#!/usr/bin/env python
"""Summarise several demo runs (``python cli.py demo --out DIR --seed S``, one folder per seed):
the README's table (LoSA, head-only, difference per seed, and the mean), AP per class averaged
over the seeds, and one side-by-side sensitivity figure over all of them.

    python bench/demo_seeds.py DIR [DIR ...] [--figure sensitivity_seeds.png]
"""
import argparse
import json
import os
import sys
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from evaluation import evaluate_detections, load_annotations  # noqa: E402
from evaluation.diagnosis import plot_sensitivity_comparison  # noqa: E402
from synth.demo import BENCHMARK_DIR, MODELS  # noqa: E402
from synth.generator import ANNOTATION_FILE  # noqa: E402


def per_class_ap(folder: Path, model: str) -> dict:
    """AP per class averaged over tIoU, from the run's predictions (report.json has no classes)."""
    ground_truth = load_annotations(str(folder / BENCHMARK_DIR / ANNOTATION_FILE))
    predictions = json.loads((folder / model / "predictions.json").read_text())
    report = evaluate_detections(ground_truth, predictions, subset="test").report()
    return {label: sum(ap) / len(ap) for label, ap in report["per_class_AP"].items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--figure", help="write the side-by-side sensitivity figure here")
    args = parser.parse_args(argv)
    reports = [json.loads((f / "report.json").read_text()) for f in args.folders]
    print("| seed | LoSA | head-only | LoSA - head-only |\n| --- | --- | --- | --- |")
    scores = {m: [100 * r[m]["average_mAP"] for r in reports] for m in MODELS}
    for r, losa, head in zip(reports, scores["losa"], scores["head_only"]):
        print(f"| {r['seed']} | {losa:.1f} | {head:.1f} | {losa - head:+.1f} |")
    mean = {m: sum(v) / len(v) for m, v in scores.items()}
    print(f"| mean ({len(reports)} seeds) | {mean['losa']:.1f} | {mean['head_only']:.1f} | "
          f"{mean['losa'] - mean['head_only']:+.1f} |")
    classes = {m: [per_class_ap(f, m) for f in args.folders] for m in MODELS}
    print("\nAP per class (%), averaged over tIoU and seeds, LoSA / head-only:")
    for label in sorted(classes["losa"][0]):
        values = [sum(c[label] for c in classes[m]) / len(args.folders) for m in MODELS]
        print(f"  {label}: " + " / ".join(f"{100 * v:.1f}" for v in values))
    print("\nseconds per seed (synth / extract / train / evaluate): " + "; ".join(
        f"{r['seed']}: " + " / ".join(f"{v:.0f}" for v in r["seconds"].values())
        for r in reports))
    if args.figure:
        diagnoses = {m: [json.loads((f / m / "diagnosis" / "diagnosis.json").read_text())
                         ["sensitivity"] for f in args.folders] for m in MODELS}
        plot_sensitivity_comparison(diagnoses, args.figure)
        for key in ("length", "instances"):
            for m in MODELS:
                bins = [[b["average_mAP_N"] for b in d[key]["bins"]] for d in diagnoses[m]]
                cells = []
                for i, b in enumerate(diagnoses[m][0][key]["bins"]):
                    seen = [row[i] for row in bins if row[i] is not None]
                    cells.append(f"{b['name']} {100 * sum(seen) / len(seen):.1f}"
                                 if seen else f"{b['name']} -")
                print(f"sensitivity by {key}, {m}: " + ", ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
