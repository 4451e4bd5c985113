#!/usr/bin/env python
"""How fast is ``python cli.py evaluate``? Times the whole command on a THUMOS-sized input.

Generates 200,000 detections over 20 classes (200 videos, about 3,000 ground-truth segments),
runs ``cli.py evaluate`` with 5 tIoU thresholds in a subprocess pinned to one CPU core (start-up,
JSON reading and evaluation all counted), then runs the straightforward per-detection reference
evaluator of the tests (tests/reference_map.py) on the same files, checks that both agree, and
prints both times and their ratio.

    python bench/eval_speed.py [--detections 200000] [--repeat 3] [--no-reference]
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

THRESHOLDS = "0.3:0.7:0.1"


def make_inputs(num_detections, num_classes, num_videos, seed):
    """A ground-truth and a predictions dict shaped like THUMOS-14 and a detector's output."""
    rng = np.random.default_rng(seed)
    classes = [f"action_{c:02d}" for c in range(num_classes)]
    database, truths = {}, []
    for v in range(num_videos):
        vid = f"video_{v:04d}"
        duration = float(rng.uniform(60, 600))
        annotations = []
        for label in rng.choice(classes, size=rng.integers(1, 4), replace=False):
            for _ in range(rng.integers(2, 12)):
                start = float(rng.uniform(0, duration - 20))
                end = start + float(rng.uniform(1, 20))
                annotations.append({"segment": [round(start, 1), round(end, 1)], "label": label})
                truths.append((vid, label, start, end))
        database[vid] = {"subset": "test", "duration": round(duration, 2), "fps": 30.0,
                         "annotations": annotations}
    per_video = num_detections // num_videos
    results = {}
    for v, vid in enumerate(database):
        duration = database[vid]["duration"]
        mine = [t for t in truths if t[0] == vid]
        near = per_video // 2  # half of them near an action, like a trained detector's output
        picks = rng.integers(0, len(mine), size=near)
        centres = np.array([(mine[i][2] + mine[i][3]) / 2 for i in picks])
        lengths = np.array([mine[i][3] - mine[i][2] for i in picks])
        centres = centres + rng.normal(0, 0.2, near) * lengths
        lengths = lengths * rng.uniform(0.6, 1.4, near)
        labels = [mine[i][1] if rng.random() < 0.8 else classes[rng.integers(num_classes)]
                  for i in picks]
        far = per_video - near
        centres = np.concatenate([centres, rng.uniform(0, duration, far)])
        lengths = np.concatenate([lengths, rng.uniform(0.5, 30, far)])
        labels += [classes[i] for i in rng.integers(0, num_classes, far)]
        starts = np.clip(centres - lengths / 2, 0, duration)
        ends = np.clip(centres + lengths / 2, 0, duration)
        scores = rng.random(per_video)
        results[vid] = [{"segment": [round(float(s), 2), round(float(e), 2)], "label": label,
                         "score": round(float(x), 5)}
                        for s, e, label, x in zip(starts, ends, labels, scores)]
    return {"database": database}, {"results": results}


def pin_to_one_core():
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_cli(gt_path, pred_path, out_path, repeat):
    """Wall-clock and CPU seconds (user + system) of each run of the whole command."""
    command = [sys.executable, os.path.join(ROOT, "cli.py"), "evaluate", "--gt", gt_path,
               "--preds", pred_path, "--tiou", THRESHOLDS, "--json", out_path]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    wall, cpu = [], []
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), child_cpu_seconds()
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL,
                       preexec_fn=pin_to_one_core)
        wall.append(time.perf_counter() - start)
        cpu.append(child_cpu_seconds() - start_cpu)
    return wall, cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--detections", type=int, default=200_000)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--videos", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-reference", action="store_true", help="skip the slow reference")
    args = parser.parse_args()

    gt, preds = make_inputs(args.detections, args.classes, args.videos, args.seed)
    with tempfile.TemporaryDirectory() as folder:
        gt_path, pred_path, out_path = (os.path.join(folder, name)
                                        for name in ("gt.json", "preds.json", "report.json"))
        for path, data in ((gt_path, gt), (pred_path, preds)):
            with open(path, "w") as file:
                json.dump(data, file)
        size_mb = os.path.getsize(pred_path) / 1e6
        print(f"input: {args.detections} detections ({size_mb:.1f} MB), {args.classes} classes, "
              f"{args.videos} videos, tIoU {THRESHOLDS}")
        wall, cpu = time_cli(gt_path, pred_path, out_path, args.repeat)
        cli_cpu = statistics.median(cpu)
        # On a shared machine wall time includes waiting for the core; CPU time does not.
        print(f"cli.py evaluate, whole command on one core, median of {args.repeat} runs: "
              f"{statistics.median(wall):.3f} s wall, {cli_cpu:.3f} s CPU "
              f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
        print(f"  wall per run: {', '.join(f'{t:.3f}' for t in wall)}")
        with open(out_path) as file:
            report = json.load(file)
        print(f"average mAP {report['average_mAP']:.4f}")
    if args.no_reference:
        return
    compare_with_reference(gt, preds, report, cli_cpu)


def compare_with_reference(gt, preds, report, cli_cpu):
    """CPU seconds of the reference and of the in-process API on the same parsed dicts."""
    sys.path.insert(0, ROOT)
    from evaluation import evaluate_map
    from reference_map import reference_map

    start = time.process_time()
    expected = reference_map(gt, preds, "test", report["tiou_thresholds"])
    reference_cpu = time.process_time() - start
    start = time.process_time()
    evaluate_map(gt, preds, "test", report["tiou_thresholds"])
    api_cpu = time.process_time() - start
    difference = float(np.max(np.abs(np.subtract(expected["mAP"], report["mAP"]))))
    print(f"reference evaluator (tests/reference_map.py) on the parsed dicts: {reference_cpu:.2f} s "
          f"CPU; evaluation.evaluate_map on the same dicts: {api_cpu:.3f} s CPU")
    print(f"largest mAP difference {difference:.2e}")
    print(f"speed ratio reference / whole cli command: {reference_cpu / cli_cpu:.1f}x; "
          f"reference / evaluate_map on the same input: {reference_cpu / api_cpu:.1f}x")
    if difference > 1e-9:
        sys.exit("the two evaluators disagree")


if __name__ == "__main__":
    main()
