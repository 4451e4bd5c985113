#!/usr/bin/env python
"""How fast are ``python cli.py evaluate`` and ``fuse``? Times whole commands on a THUMOS-sized input.

Generates 200,000 detections over 20 classes (200 videos, about 3,000 ground-truth segments)
and times, each in a subprocess pinned to one CPU core (start-up and JSON reading counted):
- the floor: a bare Python that only parses the predictions file with ``json.loads``;
- ``cli.py evaluate`` with 5 tIoU thresholds (the bound: 1.5x the floor);
- ``cli.py fuse`` on the same 200,000 detections made class-agnostic, with video-level scores
  for 20 classes, every detection kept and emitted for the top 2 classes (400,000 written).
Then it runs the straightforward per-detection reference evaluator of the tests
(tests/helpers/reference_map.py) on the same input, checks that both agree, and prints the ratios,
all measured in this one run.

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


def time_command(arguments, repeat):
    """Wall-clock and CPU seconds (user + system) of each run of ``python ARGUMENTS...``."""
    command = [sys.executable, *arguments]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    wall, cpu = [], []
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), child_cpu_seconds()
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL,
                       preexec_fn=pin_to_one_core)
        wall.append(time.perf_counter() - start)
        cpu.append(child_cpu_seconds() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def bare_parse(path):
    return ["-c", f"import json; json.loads(open({path!r}, 'rb').read())"]


def agnostic_inputs(preds, num_classes, seed):
    """The detections relabelled as one class, and CUHK-layout video-level scores."""
    rng = np.random.default_rng(seed + 1)
    results = {vid: [dict(d, label="action") for d in items]
               for vid, items in preds["results"].items()}
    scores = {vid: np.round(rng.random(num_classes), 4).tolist() for vid in results}
    classes = [f"action_{c:02d}" for c in range(num_classes)]
    return {"results": results}, {"results": scores, "class": classes}


def print_time(what, wall, cpu, repeat):
    print(f"{what}: {wall:.3f} s wall, {cpu:.3f} s CPU (median of {repeat})")


def write_inputs(folder, **named):
    paths = {}
    for name, data in named.items():
        paths[name] = os.path.join(folder, f"{name}.json")
        with open(paths[name], "w") as file:
            json.dump(data, file)
    return paths


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
    agnostic, scores = agnostic_inputs(preds, args.classes, args.seed)
    cli = os.path.join(ROOT, "cli.py")
    with tempfile.TemporaryDirectory() as folder:
        paths = write_inputs(folder, gt=gt, preds=preds, agnostic=agnostic, scores=scores)
        report_path, fused_path = os.path.join(folder, "report.json"), os.path.join(folder, "f.json")
        size_mb = os.path.getsize(paths["preds"]) / 1e6
        # On a shared machine wall time includes waiting for the core; CPU time does not.
        print(f"input: {args.detections} detections ({size_mb:.1f} MB), {args.classes} classes, "
              f"{args.videos} videos, tIoU {THRESHOLDS}; each command pinned to one core (load "
              f"average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
        floor = time_command(bare_parse(paths["preds"]), args.repeat)
        print_time("bare json.loads of the predictions file (start-up included)", *floor,
                   args.repeat)
        evaluate = time_command([cli, "evaluate", "--annotations", paths["gt"], "--preds", paths["preds"],
                                 "--tiou", THRESHOLDS, "--json", report_path], args.repeat)
        print_time("cli.py evaluate, whole command", *evaluate, args.repeat)
        fuse_floor = time_command(bare_parse(paths["agnostic"]), args.repeat)
        per_video = args.detections // args.videos
        fuse = time_command([cli, "fuse", "--preds", paths["agnostic"], "--video-scores",
                             paths["scores"], "--top-detections", str(per_video), "--out",
                             fused_path], args.repeat)
        print_time(f"cli.py fuse, whole command (top-2 of {args.classes} classes, "
                   f"{2 * per_video * args.videos} detections written)", *fuse, args.repeat)
        print(f"ratio evaluate / bare parse: {evaluate[1] / floor[1]:.2f}x CPU, "
              f"{evaluate[0] / floor[0]:.2f}x wall (bound 1.5x)")
        print(f"ratio fuse / bare parse of its input: {fuse[1] / fuse_floor[1]:.2f}x CPU, "
              f"{fuse[0] / fuse_floor[0]:.2f}x wall; fuse / evaluate: "
              f"{fuse[1] / evaluate[1]:.2f}x CPU")
        with open(report_path) as file:
            report = json.load(file)
        print(f"average mAP {report['average_mAP']:.4f}")
    if args.no_reference:
        return
    compare_with_reference(gt, preds, report, evaluate[1])


def compare_with_reference(gt, preds, report, cli_cpu):
    """CPU seconds of the reference and of the in-process API on the same parsed dicts."""
    sys.path.insert(0, ROOT)
    from evaluation import evaluate_map
    from helpers.reference_map import reference_map

    start = time.process_time()
    expected = reference_map(gt, preds, "test", report["tiou_thresholds"])
    reference_cpu = time.process_time() - start
    start = time.process_time()
    evaluate_map(gt, preds, "test", report["tiou_thresholds"])
    api_cpu = time.process_time() - start
    difference = float(np.max(np.abs(np.subtract(expected["mAP"], report["mAP"]))))
    print(f"reference evaluator (tests/helpers/reference_map.py) on the parsed dicts: "
          f"{reference_cpu:.2f} s CPU; evaluation.evaluate_map on the same dicts: {api_cpu:.3f} s CPU")
    print(f"largest mAP difference {difference:.2e}")
    print(f"speed ratio reference / whole cli command: {reference_cpu / cli_cpu:.1f}x; "
          f"reference / evaluate_map on the same input: {reference_cpu / api_cpu:.1f}x")
    if difference > 1e-9:
        sys.exit("the two evaluators disagree")


if __name__ == "__main__":
    main()
