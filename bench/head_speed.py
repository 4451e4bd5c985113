#!/usr/bin/env python
"""Is our head at least as fast and as lean as the official ActionFormer? Prints ratios.

THUMOS settings (ActionFormerHead's defaults: 512 wide, 6 levels, window 19, max_seq_len
2304), 1408-d features, 20 classes, ``--threads`` CPU threads. Both models hold the same weights
(perturbed so that every norm, scale and bias matters; ours loaded from the other's state dict,
as an official checkpoint loads), give the same outputs (the largest difference is printed
first) and run alternately in this one process, in ``--rounds`` rounds; each case runs ours,
official, official, ours (the other way round in every other round) and compares each side's
summed time:
- a training step: forward, losses and backward of a batch of 2 videos (2304 and 1800 steps);
- inference: the network's forward (no post-processing) on one video of each ``--lengths``
  steps.
It prints, per case and round, both times and the 1-minute load average; then the median over
rounds of ours / official time; then each model's peak memory for inference at each length,
measured in a fresh subprocess per model and length (the growth of the kernel's peak resident
set during the forward; Linux).

The official side is, by default, tests/helpers/reference_actionformer.py, our re-statement of
the official computation (its modules, [B, C, T] layout, LayerNorm, 1x1 convs, sliding-chunk
local attention and losses). With ``--official PATH`` it is the official code itself: the
``libs/modeling`` package of a checkout of happyharrycn/actionformer_release at PATH, imported
unmodified and built by its ``make_meta_arch("LocPointTransformer", ...)`` with the values of
its configs/thumos_i3d.yaml over its libs/core/config.py defaults, except ``dropout``, which
is set to ours (0.0; the official default is 0.1) so that both compute the same network. Two
things are stood in for, neither of them timed: the compiled NMS extension ``nms_1d_cpu``
(libs/utils/nms.py imports it; a module whose functions refuse to run is put in its place
when it is not installed), and, when ``libs/utils/__init__.py`` cannot be imported (its
evaluation and training helpers need pandas and joblib), that package's ``__init__``: the
model then gets ``batched_nms`` from the checkout's libs/utils/nms.py directly, the only name
it imports from there. The training step is the official ``model(video_list)`` in training
mode (it returns the losses); inference is its ``preprocessing``, backbone, neck and both
heads, as its ``forward`` calls them, without ``inference`` (decoding and NMS).

    python bench/head_speed.py [--official PATH] [--rounds 5] [--lengths 2304 9216 18432]
                               [--threads 2] [--no-training]
"""
import argparse
import importlib.util
import os
import statistics
import sys
import time
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from head import ActionFormerHead  # noqa: E402
from head.actionformer import load_actionformer_weights  # noqa: E402
from head.config import HeadConfig  # noqa: E402
from helpers.memory import peak_growth  # noqa: E402
from helpers.reference_actionformer import PtTransformer, look_trained  # noqa: E402

IN_DIM, CLASSES, TRAIN_LENGTHS = 1408, 20, (2304, 1800)


class Reference:
    """The official computation as tests/helpers/reference_actionformer.py states it."""

    name = "the re-implementation (tests/helpers/reference_actionformer.py)"

    def build(self):
        return PtTransformer(IN_DIM, CLASSES)

    def step(self, model, feats, segments, labels):
        model.losses([f.T for f in feats], segments, labels)["final_loss"].backward()

    def infer(self, model, x):
        with torch.no_grad():
            return model.network([x.T])


class Official:
    """The official code's ``libs/modeling`` from a checkout at ``path`` (see the docstring)."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        self.name = f"the official code at {self.path}"
        self.modeling = import_official(self.path)

    def build(self):
        return self.modeling.make_meta_arch("LocPointTransformer", **official_thumos_config())

    def step(self, model, feats, segments, labels):
        videos = [{"feats": f.T, "segments": s, "labels": lab}
                  for f, s, lab in zip(feats, segments, labels)]
        model(videos)["final_loss"].backward()

    def infer(self, model, x):
        with torch.no_grad():  # PtTransformer.forward up to its call of ``inference``
            inputs, masks = model.preprocessing([{"feats": x.T}])
            feats, masks = model.neck(*model.backbone(inputs, masks))
            cls = [c.permute(0, 2, 1) for c in model.cls_head(feats, masks)]
            offsets = [o.permute(0, 2, 1) for o in model.reg_head(feats, masks)]
            return cls, offsets, [m.squeeze(1) for m in masks]


def import_official(path):
    """The official ``libs.modeling`` package of the checkout at ``path``."""
    if importlib.util.find_spec("nms_1d_cpu") is None:
        sys.modules["nms_1d_cpu"] = untimed_nms_extension()
    sys.path.insert(0, path)
    try:
        import libs.utils  # noqa: F401
    except ImportError as error:  # its metrics / training helpers' dependencies
        print(f"libs.utils does not import ({error}); the model gets batched_nms from "
              "libs/utils/nms.py")
        for name in [n for n in sys.modules if n == "libs.utils" or n.startswith("libs.utils.")]:
            del sys.modules[name]
        sys.modules["libs.utils"] = nms_only_utils(os.path.join(path, "libs", "utils"))
    import libs.modeling
    return libs.modeling


def untimed_nms_extension():
    """Stands in for the compiled ``nms_1d_cpu`` so that libs/utils/nms.py imports."""
    def refuse(*args, **kwargs):
        raise RuntimeError("the benchmark does not run the official NMS")
    return types.SimpleNamespace(nms=refuse, softnms=refuse)


def nms_only_utils(folder):
    """A ``libs.utils`` package holding only what libs/modeling imports from it: the
    checkout's own nms.py and its ``batched_nms``."""
    package = types.ModuleType("libs.utils")
    package.__path__ = [folder]
    sys.modules["libs.utils"] = package
    spec = importlib.util.spec_from_file_location("libs.utils.nms",
                                                  os.path.join(folder, "nms.py"))
    nms = importlib.util.module_from_spec(spec)
    sys.modules["libs.utils.nms"] = nms
    spec.loader.exec_module(nms)
    package.nms, package.batched_nms = nms, nms.batched_nms
    return package


def official_thumos_config():
    """make_meta_arch's arguments for THUMOS: configs/thumos_i3d.yaml over the official
    libs/core/config.py defaults, with our input width, class count and dropout."""
    return dict(
        backbone_type="convTransformer", fpn_type="identity", backbone_arch=(2, 2, 5),
        scale_factor=2, input_dim=IN_DIM, max_seq_len=2304, max_buffer_len_factor=6.0,
        n_head=4, n_mha_win_size=19, embd_kernel_size=3, embd_dim=512, embd_with_ln=True,
        fpn_dim=512, fpn_with_ln=True, fpn_start_level=0, head_dim=512,
        regression_range=[(0, 4), (4, 8), (8, 16), (16, 32), (32, 64), (64, 10000)],
        head_num_layers=3, head_kernel_size=3, head_with_ln=True, use_abs_pe=False,
        use_rel_pe=False, num_classes=CLASSES,
        train_cfg=dict(center_sample="radius", center_sample_radius=1.5, loss_weight=1.0,
                       cls_prior_prob=0.01, init_loss_norm=100, clip_grad_l2norm=1.0,
                       head_empty_cls=[], dropout=HeadConfig().dropout, droppath=0.1,
                       label_smoothing=0.0),
        test_cfg=dict(pre_nms_thresh=0.001, pre_nms_topk=2000, iou_threshold=0.1,
                      min_score=0.001, max_seg_num=200, nms_method="soft", nms_sigma=0.5,
                      duration_thresh=0.05, multiclass_nms=False, voting_thresh=0.7))


def side(official_path):
    return Official(official_path) if official_path else Reference()


def models(theirs):
    """(ours, official) with the same weights, THUMOS settings."""
    torch.manual_seed(0)
    official = look_trained(theirs.build())
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


def ours_infer(head, x):
    with torch.no_grad():
        return head(x[None], torch.ones(1, x.shape[0], dtype=torch.bool))


def timed(fn, *args):
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def check_equal(theirs, ours, official, lengths):
    """The largest difference of logits and offsets over videos of these lengths (so that the
    timings compare the same computation)."""
    diff = 0.0
    for length in lengths:
        x = torch.randn(length, IN_DIM, generator=torch.Generator().manual_seed(1))
        got, want = ours_infer(ours, x), theirs.infer(official, x)
        diff = max([diff] + [(a - b).abs().max().item()
                             for key, ref in (("cls_logits", want[0]), ("offsets", want[1]))
                             for a, b in zip(got[key], ref)])
    assert diff < 1e-3, diff
    return diff


def load():
    return os.getloadavg()[0]


def speed(theirs, rounds, lengths, training=True):
    ours, official = models(theirs)
    diff = check_equal(theirs, ours.eval(), official.eval(),
                       sorted({2304, max(lengths, default=2304)}))
    print(f"official side: {theirs.name}\nsame weights, outputs within {diff:.1e}")
    batch = training_batch()
    videos = {n: torch.randn(n, IN_DIM, generator=torch.Generator().manual_seed(n))
              for n in lengths}
    cases = []
    if training:
        cases.append(("training step, batch 2", lambda: (ours.train(), official.train()),
                      (ours_step, ours, *batch), (theirs.step, official, *batch)))
    for n in lengths:
        cases.append((f"inference, {n} steps", lambda: (ours.eval(), official.eval()),
                      (ours_infer, ours, videos[n]), (theirs.infer, official, videos[n])))
    ratios = {name: [] for name, *_ in cases}
    loads = []
    for r in range(rounds + 1):  # round 0 warms up
        for name, mode, mine, other in cases:
            mode()
            # A B B A: whoever runs first after another case pays its page faults, and the
            # load drifts; each side's time is the sum of its two runs.
            t = {id(mine): 0.0, id(other): 0.0}
            for p in (mine, other, other, mine) if r % 2 else (other, mine, mine, other):
                t[id(p)] += timed(*p)
                for model in (ours, official):
                    model.zero_grad(set_to_none=True)
            if r:
                ratios[name].append(t[id(mine)] / t[id(other)])
                loads.append(load())
                print(f"  round {r}: {name}: ours {t[id(mine)]:.3f} s, official "
                      f"{t[id(other)]:.3f} s, ratio {ratios[name][-1]:.2f} "
                      f"(load {loads[-1]:.1f})", flush=True)
    return {name: statistics.median(values) for name, values in ratios.items()}, loads


def peak_memory(which, length, official_path):
    """Growth of the peak resident set (bytes) during one inference of ``length`` steps, in a
    fresh process that built only that model (tests/helpers/memory.py)."""
    if which == "ours":
        build, infer = "ActionFormerHead(IN_DIM, CLASSES)", "ours_infer"
    else:
        build, infer = "theirs.build()", "theirs.infer"
    return peak_growth(f"""
        import torch
        from bench.head_speed import *
        torch.set_num_threads(1)
        theirs = side({official_path!r})
        model = {build}.eval()
        x = torch.randn({length}, IN_DIM)
        """, f"{infer}(model, x)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official", metavar="PATH",
                        help="a checkout of actionformer_release (default: the re-implementation)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--lengths", type=int, nargs="*", default=[2304, 9216, 18432],
                        help="inference lengths (none: the training step only)")
    parser.add_argument("--no-training", dest="training", action="store_false",
                        help="time inference only")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ratios, loads = speed(side(args.official), args.rounds, args.lengths,
                          args.training)
    print(f"median ours / official time over {args.rounds} rounds ({args.threads} threads, "
          f"load {min(loads):.1f} to {max(loads):.1f}):")
    for name, ratio in ratios.items():
        print(f"  {name}: {ratio:.2f}x")
    if args.lengths:
        print("peak memory of inference (resident set growth, one subprocess each):")
    for n in args.lengths:
        mine, other = (peak_memory(w, n, args.official) for w in ("ours", "official"))
        print(f"  {n} steps: ours {mine / 2**20:.0f} MiB, official {other / 2**20:.0f} MiB, "
              f"ratio {mine / other:.2f}x (load {load():.1f})")


if __name__ == "__main__":
    main()
