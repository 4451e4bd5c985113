#!/usr/bin/env python
"""Is our head at least as fast and as lean as the official ActionFormer? Prints ratios.

THUMOS settings (ActionFormerHead's defaults: 512 wide, 6 levels, window 19, max_seq_len
2304), 1408-d features, 20 classes, ``--threads`` CPU threads. Both models hold the same weights
(ours loaded from the other's state dict, as an official checkpoint loads) and run alternately
in this one process, in ``--rounds`` rounds; each case runs ours, official, official, ours
(the other way round in every other round) and compares each side's summed time:
- a training step: forward, losses and backward of a batch of 2 videos (2304 and 1800 steps);
- inference (the network's forward, no post-processing: the official NMS is a compiled
  extension) of one video of each ``--lengths`` steps.
It prints, per case, the median over rounds of ours / official time, and then each model's peak
memory for inference at each length, measured in a fresh subprocess per model and length (the
growth of the kernel's peak resident set during the forward; Linux).

The official side is tests/helpers/reference_actionformer.py, our re-implementation of the
official code: its modules, [B, C, T] layout, LayerNorm, 1x1 convs and losses, and its
sliding-chunk local attention with the official tensor sizes (memory linear in T), so that its
time and memory stand for the official code's (we copy no code from it).

    python bench/head_speed.py [--rounds 5] [--lengths 2304 9216 18432] [--threads 2]
"""
import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from head import ActionFormerHead  # noqa: E402
from head.actionformer import load_actionformer_weights  # noqa: E402
from helpers.memory import peak_growth  # noqa: E402
from helpers.reference_actionformer import PtTransformer  # noqa: E402

IN_DIM, CLASSES, TRAIN_LENGTHS = 1408, 20, (2304, 1800)


def models():
    """(ours, official) with the same weights, THUMOS settings."""
    torch.manual_seed(0)
    official = PtTransformer(IN_DIM, CLASSES)
    ours = ActionFormerHead(IN_DIM, CLASSES)
    load_actionformer_weights(ours, official.state_dict())
    assert sum(p.numel() for p in ours.parameters()) == sum(
        p.numel() for p in official.parameters())
    return ours, official


def training_batch(seed=0):
    """Features [T_i, D] and ground truth of a THUMOS-like batch."""
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(n, IN_DIM, generator=g) for n in TRAIN_LENGTHS]
    segments, labels = [], []
    for n in TRAIN_LENGTHS:
        starts = torch.rand(12, generator=g) * (n - 200)
        segments.append(torch.stack([starts, starts + 5 + torch.rand(12, generator=g) * 150], 1))
        labels.append(torch.randint(0, CLASSES, (12,), generator=g))
    return feats, segments, labels


def ours_step(head, feats, segments, labels):
    length = max(TRAIN_LENGTHS)
    batch = torch.zeros(len(feats), length, IN_DIM)
    for row, f in zip(batch, feats):
        row[:f.shape[0]] = f
    mask = torch.arange(length)[None] < torch.tensor([f.shape[0] for f in feats])[:, None]
    out = head(batch, mask)
    targets = [{"segments": s, "labels": lab} for s, lab in zip(segments, labels)]
    head.loss(out, targets)["total"].backward()


def official_step(model, feats, segments, labels):
    model.losses([f.T for f in feats], segments, labels)["final_loss"].backward()


def ours_infer(head, x):
    with torch.no_grad():
        return head(x[None], torch.ones(1, x.shape[0], dtype=torch.bool))


def official_infer(model, x):
    with torch.no_grad():
        return model.network([x.T])


def timed(fn, *args):
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def check_equal(ours, official, length=2304):
    """The two agree on a video (so the timings compare the same computation)."""
    x = torch.randn(length, IN_DIM, generator=torch.Generator().manual_seed(1))
    got, want = ours_infer(ours, x), official_infer(official, x)
    diff = max((a - b).abs().max().item() for key, ref in (("cls_logits", want[0]),
                                                            ("offsets", want[1]))
               for a, b in zip(got[key], ref))
    assert diff < 1e-3, diff
    return diff


def speed(rounds, lengths):
    ours, official = models()
    print(f"same weights, outputs within {check_equal(ours.eval(), official.eval()):.1e}")
    batch = training_batch()
    videos = {n: torch.randn(n, IN_DIM, generator=torch.Generator().manual_seed(n))
              for n in lengths}
    cases = [("training step, batch 2", lambda: (ours.train(), official.train()),
              (ours_step, ours, *batch), (official_step, official, *batch))]
    for n in lengths:
        cases.append((f"inference, {n} steps", lambda: (ours.eval(), official.eval()),
                      (ours_infer, ours, videos[n]), (official_infer, official, videos[n])))
    ratios = {name: [] for name, *_ in cases}
    for r in range(rounds + 1):  # round 0 warms up
        for name, mode, mine, theirs in cases:
            mode()
            # A B B A: whoever runs first after another case pays its page faults, and the
            # load drifts; each side's time is the sum of its two runs.
            t = {id(mine): 0.0, id(theirs): 0.0}
            for p in (mine, theirs, theirs, mine) if r % 2 else (theirs, mine, mine, theirs):
                t[id(p)] += timed(*p)
                for model in (ours, official):
                    model.zero_grad(set_to_none=True)
            if r:
                ratios[name].append(t[id(mine)] / t[id(theirs)])
                print(f"  round {r}: {name}: ours {t[id(mine)]:.3f} s, official "
                      f"{t[id(theirs)]:.3f} s", flush=True)
    return {name: statistics.median(values) for name, values in ratios.items()}


def peak_memory(which, length):
    """Growth of the peak resident set (bytes) during one inference of ``length`` steps, in a
    fresh process that built only that model (tests/helpers/memory.py)."""
    build = ("ActionFormerHead(IN_DIM, CLASSES)" if which == "ours"
             else "PtTransformer(IN_DIM, CLASSES)")
    return peak_growth(f"""
        import torch
        from bench.head_speed import *
        torch.set_num_threads(1)
        model = {build}.eval()
        x = torch.randn({length}, IN_DIM)
        """, f"{which}_infer(model, x)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2304, 9216, 18432])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ratios = speed(args.rounds, args.lengths)
    print(f"median ours / official time over {args.rounds} rounds ({args.threads} threads):")
    for name, ratio in ratios.items():
        print(f"  {name}: {ratio:.2f}x")
    print("peak memory of inference (resident set growth, one subprocess each):")
    for n in args.lengths:
        mine, theirs = (peak_memory(w, n) for w in ("ours", "official"))
        print(f"  {n} steps: ours {mine / 2**20:.0f} MiB, official {theirs / 2**20:.0f} MiB, "
              f"ratio {mine / theirs:.2f}x")


if __name__ == "__main__":
    main()
