#!/usr/bin/env python
"""Why does the long-context class (dash_after_signal) gain least? Four measurements on a demo
output folder (``python cli.py demo --out DIR``: its benchmark and store):

1. Head receptive field: which input steps can change a level's class logit at one point
   (gradient support of the demo head, float64), in steps and seconds, per pyramid level, next
   to the 8 s a flash may precede its dash.
2. Is the flash in the stored features? A linear probe (logistic regression, trained on the
   train videos' clips, scored on the test videos' clips by AP) per stored layer: the last layer
   (the Key/Value of both adapters), each intermediate layer as the long-range adapter's query
   sees it (tokens averaged) and as the short-range one does (tokens concatenated).
3. Can a dash's own clips tell dash from dash_after_signal? The same probe on the mean features
   of each dash's clips; against it, one number from the context (the highest last-layer
   flash-probe score in the 8 s before the dash, 8 s either side, within the head's level-0
   receptive field, or in the whole video: what an attention that knows where it looks, a band
   without position, the head alone, and a global attention without position could find) with
   the best threshold on the train dashes.
4. How many dash_after_signal instances does the test split hold (the AP's sample size)?
5. With ``--context`` (a benchmark with the global-context classes, e.g. bench/ablate.py's
   output folder): is the cue's colour, which labels the video's shakes, in the last layer?
   A probe per video on the mean of the clips the cue overlaps (what an attention that found
   the cue reads), the same on the mean of all clips (what a uniform global attention
   reads), and a clip probe that finds the cue's clips among the rest (AP on the test clips).

    python bench/long_range.py --demo demo_out [--seed 0] [--videos 40] [--context]
                               [--json out.json]
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from losa_tal import write_output  # noqa: E402
from store.feature_store import FeatureStore  # noqa: E402
from store.meta import LAST  # noqa: E402
from synth.config import SynthConfig  # noqa: E402
from synth.demo import BENCHMARK_DIR, STORE_DIR, TRAIN_CONFIG  # noqa: E402
from synth.generator import (ANNOTATION_FILE, CONTEXT_CLASSES, SIGNAL_WINDOW_S,  # noqa: E402
                             plan_video)
from training.config import load_config  # noqa: E402

CLIP_FRAMES = 16  # the demo's sampling protocol: 16-frame clips


def receptive_field(length: int = 128, dim: int = 16) -> list:
    """Per pyramid level: how many input steps before and after a mid-sequence point can move
    its class logits (nonzero gradient), for the demo config's head."""
    from head import ActionFormerHead

    config = load_config(TRAIN_CONFIG)
    torch.manual_seed(0)
    head = ActionFormerHead.from_config(dim, 6, config.head).double()
    head.eval()
    reach = []
    for level, stride in enumerate(head.strides):
        x = torch.randn(1, length, dim, dtype=torch.float64, requires_grad=True)
        out = head(x, torch.ones(1, length, dtype=torch.bool))
        point = length // 2 // stride
        out["cls_logits"][level][0, point].sum().backward()
        support = np.flatnonzero(x.grad[0].abs().sum(-1).numpy() > 0)
        centre = point * stride
        reach.append({"level": level, "stride": stride, "point_step": centre,
                      "steps_before": int(centre - support.min()),
                      "steps_after": int(support.max() - centre)})
    return reach


def clip_frames(store, video):
    """[T, 2] first and last+1 frame of each clip, from the stored clip-centre times."""
    info = store.video_info(video)
    centres = store.feature_times(video) * info["fps"]
    return np.stack([centres - CLIP_FRAMES / 2, centres + CLIP_FRAMES / 2], axis=1)


def layer_views(store, video) -> dict:
    """{name: [T, F]} for each way an adapter or the head reads a stored layer."""
    features = store.read(video)
    views = {"last": features[LAST]}
    for layer in store.layers:
        views[f"block {layer}, tokens averaged"] = features[layer].mean(axis=1)
        views[f"block {layer}, tokens concatenated"] = features[layer].reshape(
            len(features[layer]), -1)
    return views


def flash_labels(plan, frames) -> np.ndarray:
    """1 where a clip overlaps a border flash."""
    flashes = [(s.start, s.stop) for s in plan.segments if s.motion == "signal"]
    return np.array([any(a < stop and start < b for start, stop in flashes)
                     for a, b in frames], dtype=np.float64)


def fit_probe(x, y, steps: int = 200, l2: float = 1e-3):
    """Logistic regression on standardised features (L-BFGS); returns a scoring function."""
    x = np.asarray(x, dtype=np.float64)
    mean, std = x.mean(0), x.std(0) + 1e-6
    xs = torch.as_tensor((x - mean) / std)
    ys = torch.as_tensor(y)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    positive = max(float(ys.mean()), 1e-6)
    weight = torch.where(ys > 0, 0.5 / positive, 0.5 / max(1 - positive, 1e-6))  # balanced
    optimiser = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = (weight * torch.nn.functional.binary_cross_entropy_with_logits(
            xs @ w + b, ys, reduction="none")).mean() + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    w, b = w.detach().numpy(), float(b.detach())
    return lambda z: ((z - mean) / std) @ w + b


def average_precision(scores, labels) -> float:
    """Non-interpolated AP of a ranking (the mean precision at each positive)."""
    order = np.argsort(-scores, kind="stable")
    hits = labels[order] > 0
    if not hits.any():
        return float("nan")
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


def load_benchmark(demo: str, synth: SynthConfig):
    annotations = json.load(open(os.path.join(demo, BENCHMARK_DIR, ANNOTATION_FILE)))
    store = FeatureStore.open(os.path.join(demo, STORE_DIR))
    videos = []
    for index in range(synth.videos):
        plan = plan_video(synth, index)
        frames = clip_frames(store, plan.video_id)
        videos.append({"id": plan.video_id, "subset": plan.subset, "plan": plan,
                       "frames": frames, "flash": flash_labels(plan, frames),
                       "views": layer_views(store, plan.video_id),
                       "gt": annotations["database"][plan.video_id]["annotations"]})
    return videos


def probe_flash(videos) -> dict:
    """AP of the flash probe on the test clips, per layer view (and the base rate)."""
    split = lambda subset, key: np.concatenate(  # noqa: E731
        [v["views"][key] if key != "flash" else v["flash"] for v in videos
         if v["subset"] == subset])
    result = {"test_positive_rate": float(split("test", "flash").mean()), "AP": {}, "probes": {}}
    for key in videos[0]["views"]:
        probe = fit_probe(split("train", key), split("train", "flash"))
        result["AP"][key] = average_precision(probe(split("test", key)), split("test", "flash"))
        result["probes"][key] = probe
    return result


def dash_examples(videos, synth, flash_probe, head_reach_s: float):
    """Per annotated dash: subset, label (1 = after signal), the mean of its clips' features per
    view, and the highest last-layer flash score in the SIGNAL_WINDOW_S seconds before it."""
    examples = []
    for v in videos:
        centres = v["frames"].mean(axis=1) / synth.fps
        score = flash_probe(v["views"]["last"])
        for a in v["gt"]:
            if a["label"] not in ("dash", "dash_after_signal"):
                continue
            start, end = a["segment"]
            inside = (centres >= start) & (centres <= end)
            if not inside.any():
                inside = np.abs(centres - (start + end) / 2) == np.abs(
                    centres - (start + end) / 2).min()
            # Where an attention without position information could find the flash.
            reach = {"the 8 s before": (centres >= start - SIGNAL_WINDOW_S) & (centres < start),
                     "8 s either side": np.abs(centres - start) <= SIGNAL_WINDOW_S,
                     f"the head's level-0 field ({head_reach_s:.1f} s either side)":
                         np.abs(centres - (start + end) / 2) <= head_reach_s,
                     "the whole video": np.ones_like(centres, dtype=bool)}
            examples.append({"subset": v["subset"], "label": a["label"] == "dash_after_signal",
                             "local": {k: x[inside].mean(0) for k, x in v["views"].items()},
                             "context": {k: float(score[r].max()) if r.any() else -1e9
                                         for k, r in reach.items()}})
    return examples


def probe_dashes(examples) -> dict:
    train = [e for e in examples if e["subset"] == "train"]
    test = [e for e in examples if e["subset"] == "test"]
    y_train = np.array([e["label"] for e in train], dtype=np.float64)
    y_test = np.array([e["label"] for e in test], dtype=np.float64)
    majority = float(max(y_test.mean(), 1 - y_test.mean()))
    local = {}
    for key in train[0]["local"]:
        probe = fit_probe(np.stack([e["local"][key] for e in train]), y_train)
        predicted = probe(np.stack([e["local"][key] for e in test])) > 0
        local[key] = float((predicted == (y_test > 0)).mean())
    # One number from the context, the highest flash score in reach: the best threshold on
    # the train dashes, scored on the test dashes.
    context = {}
    for reach in train[0]["context"]:
        score_train = np.array([e["context"][reach] for e in train])
        score_test = np.array([e["context"][reach] for e in test])
        thresholds = np.unique(score_train)
        accuracy = [((score_train >= t) == (y_train > 0)).mean() for t in thresholds]
        best = thresholds[int(np.argmax(accuracy))]
        context[reach] = float(((score_test >= best) == (y_test > 0)).mean())
    return {"train_dashes": len(train), "test_dashes": len(test),
            "test_after_signal": int(y_test.sum()), "majority_accuracy": majority,
            "local_accuracy": local, "context_accuracy": context}


def probe_cue(videos) -> dict:
    """Step 5 (see the module docstring): test accuracy of the colour probes, their majority
    class, and the AP of the cue-clip probe with its base rate."""
    colour, views, clips = [], {"the cue's clips": [], "all clips": []}, []
    for v in videos:
        (cue,) = [s for s in v["plan"].segments if s.motion == "cue"]
        lit = np.array([a < cue.stop and cue.start < b for a, b in v["frames"]])
        last = v["views"]["last"]
        views["the cue's clips"].append(last[lit].mean(0))
        views["all clips"].append(last.mean(0))
        colour.append(float(cue.params["label"] == CONTEXT_CLASSES[0]))
        clips.append((v["subset"], last, lit.astype(np.float64)))
    colour, train = np.array(colour), np.array([v["subset"] == "train" for v in videos])
    accuracy = {}
    for name, x in views.items():
        x = np.stack(x)
        predicted = fit_probe(x[train], colour[train])(x[~train]) > 0
        accuracy[name] = float((predicted == (colour[~train] > 0)).mean())
    split = lambda subset, i: np.concatenate([c[i] for c in clips if c[0] == subset])  # noqa: E731
    probe = fit_probe(split("train", 1), split("train", 2))
    return {"test_videos": int((~train).sum()),
            "majority_accuracy": float(max(colour[~train].mean(), 1 - colour[~train].mean())),
            "colour_accuracy": accuracy, "cue_clip_rate": float(split("test", 2).mean()),
            "cue_clip_AP": average_precision(probe(split("test", 1)), split("test", 2))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", required=True, help="a `cli.py demo` output folder")
    parser.add_argument("--seed", type=int, default=0, help="the demo's --seed")
    parser.add_argument("--videos", type=int, default=SynthConfig.videos, help="its --videos")
    parser.add_argument("--context", action="store_true",
                        help="the benchmark holds the global-context classes (step 5)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    synth = SynthConfig(seed=args.seed, videos=args.videos, context=args.context)
    videos = load_benchmark(args.demo, synth)
    step_s = float(np.median(np.diff(videos[0]["frames"][:, 0]))) / synth.fps
    reach = receptive_field()
    print(f"1. head receptive field (demo config; one feature step = {step_s:.3f} s; a flash "
          f"may come up to {SIGNAL_WINDOW_S:g} s = {SIGNAL_WINDOW_S / step_s:.0f} steps before "
          "its dash):")
    for r in reach:
        print(f"   level {r['level']} (stride {r['stride']}): {r['steps_before']} steps "
              f"({r['steps_before'] * step_s:.1f} s) before, {r['steps_after']} after")
    flash = probe_flash(videos)
    print(f"2. flash probe, AP on the test clips (base rate {flash['test_positive_rate']:.3f}):")
    for key, ap in flash["AP"].items():
        print(f"   {key}: {ap:.3f}")
    dashes = probe_dashes(dash_examples(videos, synth, flash["probes"]["last"],
                                        reach[0]["steps_before"] * step_s))
    print(f"3. dash vs dash_after_signal on the {dashes['test_dashes']} test dashes "
          f"(majority class {dashes['majority_accuracy']:.3f}):")
    for key, accuracy in dashes["local_accuracy"].items():
        print(f"   from the dash's own clips, {key}: {accuracy:.3f}")
    for reach, accuracy in dashes["context_accuracy"].items():
        print(f"   from the last layer's highest flash score in {reach}: {accuracy:.3f}")
    print(f"4. test split: {dashes['test_after_signal']} dash_after_signal and "
          f"{dashes['test_dashes'] - dashes['test_after_signal']} dash instances "
          f"({dashes['train_dashes']} dashes in train)")
    figures = {"step_seconds": step_s, "receptive_field": reach, "dashes": dashes}
    if args.context:
        cue = figures["cue"] = probe_cue(videos)
        print(f"5. the cue's colour on the {cue['test_videos']} test videos (majority class "
              f"{cue['majority_accuracy']:.3f}):")
        for name, accuracy in cue["colour_accuracy"].items():
            print(f"   from the last layer's mean over {name}: {accuracy:.3f}")
        print(f"   the cue's clips found by a clip probe: AP {cue['cue_clip_AP']:.3f} (base rate "
              f"{cue['cue_clip_rate']:.3f})")
    if args.json:
        flash.pop("probes")
        write_output(args.json, json.dumps({**figures, "flash_probe": flash}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
