#!/usr/bin/env python
"""The GPU check: one run that says whether this machine trains and extracts as it should.

Run by ``bench/gpu_check.sh`` (``make gpu-check``; docs/gpu_check.md gives the one-call command
for a bare, offline GPU machine). Each section runs in its own process under its own timeout,
prints its figures on lines prefixed by its name, then one ``== name: ok, N s`` line as it ends;
``--out DIR`` receives summary.json (every section's status, seconds, lines and figures),
rewritten as each section ends so that a run cut short still leaves what it measured.

  device       the device, its memory and bf16 peak; torch, CUDA, cuDNN, NCCL, Python and the
               versions of the packages the project imports;
  sdpa         the kernel each scaled-dot-product-attention call really dispatches to (flash,
               efficient, cudnn, or the unfused math path), recorded during one forward of the
               backbone (as extraction runs it) and of the LoSA detector (as training runs it);
  backbone     ViT-g in bf16 (bf16 weights, autocast): clips/s, MFU against the device's own
               bf16 peak, peak memory; the bf16-vs-fp32 cosine of the stored features;
  resize       ``--resize-on device`` against the official CPU transform on decoded frames;
  pipeline     the real extraction pipeline (decoding workers included) on generated 320x180
               videos: clips/s, and its ratio to the backbone alone on as many clips;
  train        one LoSA step (with and without ``checkpoint_layers``) and one head-only step of
               the default config on the default layout: seconds and ``max_memory_allocated``;
  crosscheck   the same LoSA + head batch on this device and on the CPU: outputs, losses and
               every gradient in fp32 (within 1e-4) and under bf16 autocast (TOLERANCES);
  epoch        a one-epoch ``cli.py train`` on a generated store of the default layout;
  loader       the training loader from the store and from the cache (bench/loader.py), on the
               epoch's store;
  collectives  a one-process NCCL group through every collective the code calls (through
               losa_distributed.py) and a DDP backward;
  demo         the demo's LoSA training on this device against five training seeds on the CPU,
               from one demo store: the device's mAP must lie within the CPU seeds' spread.

Without CUDA (or with ``--reduced``) every section runs at toy sizes on the CPU (gloo for the
group), so CI runs this script end to end; its figures then say nothing about speed.
"""
import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.extract import backbone_figures, backbone_line, bf16_peak  # noqa: E402
from bench.train import loader_fed_epoch, random_batch, time_steps  # noqa: E402
from extract.backbone import build_backbone  # noqa: E402
from extract.config import ExtractionConfig, load_preset  # noqa: E402
from training.config import load_config  # noqa: E402

PRESET = load_preset("thumos")  # the default ViT-g layout
CONFIG = ROOT / "configs" / "train" / "thumos_vitg_losa.json"
DEMO_CONFIG = ROOT / "configs" / "demo" / "train.json"
GIB = 2 ** 30
# The collectives the code calls (losa_distributed.py); the collectives section
# runs each, and tests/test_gpu_check_offline.py checks that the code calls no other.
COLLECTIVES = ("all_reduce", "all_gather", "barrier")
# How far this device may be from the CPU on one LoSA + head batch: the relative L2 error of
# each part (outputs, losses, gradients), over all its tensors together. fp32 differs only in
# summation order. bf16 autocast keeps 8 bits of mantissa (2^-9 = 2e-3 relative rounding per
# operation): on the CPU its outputs and losses came within 1e-3 of fp32 and its gradients
# within 9e-2 (cosine 0.996) at toy and medium widths (docs/gpu_check.md); the bounds leave
# room for other kernels while a wrong kernel, mask or dtype gives errors of order one.
TOLERANCES = {"fp32": {"outputs": 1e-4, "losses": 1e-4, "gradients": 1e-4},
              "bf16 autocast": {"outputs": 1e-2, "losses": 1e-2, "gradients": 2e-1}}

class Sizes:
    """What each section runs: the real shapes on CUDA, toy ones for the reduced check."""

    def __init__(self, reduced: bool):
        self.reduced = reduced
        self.backbone = {"preset": "vit_s", "depth": 2} if reduced else "vit_g"
        self.img_size = 64 if reduced else 224
        self.batch = 2 if reduced else 32
        self.clips = 4 if reduced else 256
        self.cosine_clips = 2 if reduced else 8
        self.layers = [0, 1] if reduced else PRESET.layers
        self.videos, self.frames = (1, 40) if reduced else (4, 600)
        self.workers = 1 if reduced else PRESET.num_workers
        self.dim = 32 if reduced else 1408
        self.length = 64 if reduced else 2304
        self.cross_length = 64 if reduced else 512  # the CPU side of crosscheck must stay quick
        self.epoch_videos = 4  # two steps at batch 2: one after the first
        self.model_overrides = ["head.embed_dim=32", "head.num_heads=2",
                                "model.losa.bottleneck=16", "model.losa.num_heads=2"] \
            if reduced else []
        self.loader_args = ["--batches", "2", "--workers", "1"] if reduced else []
        # demo: CPU training seeds, and the synthetic benchmark and epochs (the demo's own on
        # CUDA; a few short videos and epochs in the reduced form)
        self.demo_seeds = 2 if reduced else 5
        self.demo_synth = {"videos": 12, "min_seconds": 8.0, "max_seconds": 12.0} \
            if reduced else {}
        self.demo_overrides = ["train.epochs=10"] if reduced else []


# -- reporting -----------------------------------------------------------------------------------

class Result:
    """A section's lines and figures, rewritten to its file after every line (a section killed
    at its timeout keeps what it printed)."""

    def __init__(self, path):
        self.path = Path(path) if path else None
        self.lines, self.figures = [], {}

    def say(self, section, text, **figures):
        print(f"{section}: {text}", flush=True)
        self.lines.append(text)
        self.figures.update(figures)
        self.write()

    def write(self, **extra):
        if self.path is not None:
            record = {"lines": self.lines, "figures": self.figures, **extra}
            self.path.write_text(json.dumps(record, indent=1, default=str))


RESULT = Result(None)
say = RESULT.say


# -- device --------------------------------------------------------------------------------------

def package_versions() -> tuple:
    """The versions of the packages the project imports, and the folder each came from (on the
    GPU machine the wheels' folder for those it lacks)."""
    from importlib import metadata

    versions, folders = {}, {}
    for name in ("numpy", "timm", "av", "decord", "zarr", "numcodecs", "orjson", "h5py",
                 "fsspec"):
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
            continue
        versions[name] = distribution.version
        folders.setdefault(str(distribution.locate_file("")), []).append(name)
    return versions, folders


def device_section(device, sizes, work):
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version(), "python": platform.python_version()}
    if device.type == "cuda":
        nccl = torch.cuda.nccl.version()  # a tuple in recent torch, an int before
        versions["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    packages, folders = package_versions()
    text = ", ".join(f"{k} {v}" for k, v in {**versions, **packages}.items()) + "; " + \
        "; ".join(f"{', '.join(names)} from {folder}" for folder, names in folders.items())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        peak = bf16_peak(props.name)
        say("device", f"{props.name}, {props.total_memory / GIB:.0f} GiB, compute capability "
                      f"{props.major}.{props.minor}, {props.multi_processor_count} SMs, bf16 peak "
                      f"{(peak or 0) / 1e12:.0f} TFLOP/s; {text}",
            name=props.name, memory_gib=props.total_memory / GIB,
            capability=f"{props.major}.{props.minor}", bf16_peak_tflops=(peak or 0) / 1e12,
            versions={**versions, **packages}, package_folders=folders)
    else:
        say("device", f"CPU only ({os.cpu_count()} cores): reduced check; {text}",
            name="cpu", versions={**versions, **packages}, package_folders=folders)


# -- SDPA kernels --------------------------------------------------------------------------------

# The fused operators scaled_dot_product_attention dispatches to; with none of them the call
# ran the unfused math path (matmuls and a softmax).
FUSED_SDPA = {"_scaled_dot_product_flash_attention": "flash",
              "_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
              "_scaled_dot_product_efficient_attention": "efficient",
              "_scaled_dot_product_cudnn_attention": "cudnn",
              "_scaled_dot_product_fused_attention_overrideable": "overrideable"}


def sdpa_section(device, sizes, work):
    """Each attention call of one backbone forward and one detector forward, with the fused
    operator the dispatcher really chose for it (seen below autograd and autocast by a
    TorchDispatchMode)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class FusedOps(TorchDispatchMode):
        seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._overloadpacket.__name__
            if name in FUSED_SDPA:
                self.seen.append(FUSED_SDPA[name])
            return func(*args, **(kwargs or {}))

    calls = {}
    real = F.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, *args, **kwargs):
        caller = sys._getframe(1).f_globals["__name__"]  # extract.backbone, adapt.losa, ...
        before = len(FusedOps.seen)
        out = real(query, key, value, attn_mask, *args, **kwargs)
        kernel = ", ".join(FusedOps.seen[before:]) or "math (unfused)"
        calls.setdefault((caller, tuple(query.shape), tuple(key.shape), str(query.dtype)[6:],
                          attn_mask is not None), kernel)
        return out

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with torch.device(device):
        model = build_backbone(sizes.backbone, img_size=sizes.img_size)
    model = model.eval().to(device, dtype)
    detector, batch = _detector_and_batch(device, sizes, "losa", length=256)
    F.scaled_dot_product_attention = recording
    try:
        with FusedOps():
            with torch.inference_mode(), autocast:  # as extraction runs it
                model.forward_taps(torch.rand(1, 3, 16, sizes.img_size, sizes.img_size,
                                              device=device, dtype=dtype), sizes.layers)
            with autocast:  # as training runs it: train mode (dropout), gradients on
                detector.train()(batch)
    finally:
        F.scaled_dot_product_attention = real
    records = []
    for (caller, query, key, precision, mask), kernel in calls.items():
        records.append({"caller": caller, "q": query, "k": key, "dtype": precision,
                        "mask": mask, "kernel": kernel})
        say("sdpa", f"{caller}: {kernel} (q {query}, k {key}, {precision}, "
                    f"{'mask' if mask else 'no mask'})", calls=records)


def _detector_and_batch(device, sizes, model_type, length, batch_size=1, overrides=()):
    from training.data import batch_to
    from training.detector import Detector

    config = load_config(CONFIG, [f"model.type={model_type}", *overrides,
                                  *sizes.model_overrides])
    tokens = int(np.prod(PRESET.tokens))
    torch.manual_seed(0)
    detector = Detector(sizes.dim, 20, len(sizes.layers), tokens, config.model,
                        config.head).to(device)
    batch = batch_to(random_batch(batch_size, length, len(sizes.layers), tokens, sizes.dim),
                     device, device.type == "cuda")
    return detector, batch


# -- backbone speed and precision ---------------------------------------------------------------

def backbone_section(device, sizes, work):
    figures = backbone_figures(device, sizes.backbone, sizes.batch, sizes.clips, sizes.layers,
                               sizes.img_size)
    say("backbone", backbone_line(figures), speed=figures)
    line, cosines = cosine_line(device, sizes)
    say("backbone", line, one_minus_cosine=cosines)


def cosine_line(device, sizes):
    """bf16 (bf16 weights, autocast) against fp32 on the same random-weight model and clips."""
    from extract.pooling import pool_tokens

    torch.manual_seed(0)
    with torch.device(device):
        exact = build_backbone(sizes.backbone, img_size=sizes.img_size).eval()
        low = build_backbone(sizes.backbone, img_size=sizes.img_size).eval()
    low.load_state_dict(exact.state_dict())
    low = low.to(device, torch.bfloat16)
    clips = torch.rand(sizes.cosine_clips, 3, 16, sizes.img_size, sizes.img_size, device=device)
    grid = exact.token_grid_for(16, sizes.img_size, sizes.img_size)
    tokens = tuple(PRESET.tokens)
    results = []
    with torch.inference_mode():
        for model, autocast in ((exact, False), (low, True)):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                pooled, taps = model.forward_taps(clips, sizes.layers)
                results.append([pooled.float()] + [pool_tokens(t, grid, tokens) for t in taps])
    cosines = [F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double()).min().item()
               for a, b in zip(*results)]
    errors = [1 - c for c in cosines]
    return (f"bf16 vs fp32 stored features, 1 - cosine of the worst of {len(clips)} clips: last "
            f"layer {errors[0]:.1e}, pooled tokens of blocks {sizes.layers}: "
            + ", ".join(f"{e:.1e}" for e in errors[1:])), errors


# -- the resize on the device ---------------------------------------------------------------------

def resize_section(device, sizes, work):
    folder = Path(work) / "resize"
    folder.mkdir(exist_ok=True)
    say("resize", resize_line(device, sizes.img_size, folder))


def resize_line(device, img_size, folder):
    """The frames of ``--resize-on device`` (scaled and resized on ``device``) against the
    official CPU transform, on 16 decoded frames of a generated 320x180 H.264 video; on the CPU
    also one plain F.interpolate of [F, 3, H, W] (another CPU kernel path), for scale."""
    from bench.extract import write_videos
    from extract.clips import _interpolate, scale_frames
    from extract.decoding import open_video
    from store.protocol import SamplingProtocol

    (_, path), = write_videos(folder, 1, 16)
    source = open_video(path)
    raw = torch.from_numpy(np.concatenate(list(source.read(np.arange(16)))))
    source.close()
    official = scale_frames(raw, SamplingProtocol(img_size=img_size))
    others = {str(device): scale_frames(raw.to(device), SamplingProtocol(
        img_size=img_size, resize_on="device")).cpu()}
    if device.type == "cpu":
        others["plain F.interpolate"] = _interpolate(
            raw.permute(0, 3, 1, 2).float() / 255, (img_size, img_size))
    torch.manual_seed(0)
    model = build_backbone({"preset": "vit_s", "depth": 2}, img_size=img_size).eval()
    with torch.inference_mode():
        features = {name: model.forward_features(frames.permute(1, 0, 2, 3)[None])
                    for name, frames in {"official": official, **others}.items()}
    parts = []
    for name, frames in others.items():
        pixels = (frames - official).abs().max().item() * 255
        feature = (features[name] - features["official"]).abs().max().item()
        cosine = F.cosine_similarity(features[name].double(), features["official"].double())
        parts.append(f"{name}: max |pixel difference| {pixels:.2g}/255, max |feature "
                     f"difference| {feature:.2g}, feature 1 - cosine "
                     f"{max(0.0, 1 - cosine.item()):.1e}")
    return (f"resize of 16 decoded 320x180 frames to {img_size}x{img_size} against the official "
            "CPU transform; " + "; ".join(parts))


# -- the extraction pipeline ----------------------------------------------------------------------

def pipeline_section(device, sizes, work):
    from bench.extract import write_videos
    from extract.pipeline import ExtractionSettings, run_extraction
    from store.protocol import SamplingProtocol

    folder = Path(work) / "pipeline"
    folder.mkdir(exist_ok=True)
    videos = write_videos(folder, sizes.videos, sizes.frames)
    settings = ExtractionSettings(ExtractionConfig(
        store=str(folder / "pipeline.zarr"), backbone=sizes.backbone,
        protocol=SamplingProtocol(img_size=sizes.img_size), layers=sizes.layers,
        tokens=PRESET.tokens, batch_size=sizes.batch, num_workers=sizes.workers,
        device=str(device)), videos=videos)
    summary = run_extraction(settings, show_progress=False)
    rate = summary.clips / summary.seconds
    alone = backbone_figures(device, sizes.backbone, sizes.batch, summary.clips, sizes.layers,
                             sizes.img_size)["clips_per_s"]
    say("pipeline", f"{summary.clips} clips of {len(videos)} generated 320x180 videos in "
                    f"{summary.seconds:.1f} s = {rate:.1f} clips/s ({sizes.workers} decoding "
                    f"workers, batch {sizes.batch}, worker start-up included); the backbone "
                    f"alone {alone:.1f} clips/s; pipeline/backbone time {alone / rate:.2f} "
                    "(1.00: decoding and writing fully hidden)",
        clips=summary.clips, clips_per_s=rate, backbone_clips_per_s=alone,
        time_ratio=alone / rate)


# -- training ------------------------------------------------------------------------------------

def train_section(device, sizes, work):
    batch = load_config(CONFIG).train.batch_size
    tokens = int(np.prod(PRESET.tokens))
    steps = {}
    for name, overrides in (("LoSA", []),
                            ("LoSA checkpoint_layers", ["model.losa.checkpoint_layers=true"]),
                            ("head-only", ["model.type=head_only"])):
        config = load_config(CONFIG, overrides + sizes.model_overrides)
        seconds, peak, _ = time_steps(config, device, batch, sizes.length, tokens,
                                      steps=1 if sizes.reduced else 3, dim=sizes.dim,
                                      num_layers=len(sizes.layers))
        memory = (f"max_memory_allocated {peak / GIB:.2f} GiB" if device.type == "cuda"
                  else f"peak RSS {peak / GIB:.2f} GiB")
        steps[name] = {"seconds": seconds, "peak_gib": peak / GIB}
        say("train", f"{name}: {seconds:.3f} s/step, {memory} (batch {batch}, {sizes.length} "
                     f"steps, {len(sizes.layers)} layers x K {tokens}, D {sizes.dim})",
            steps=steps)


# -- this device against the CPU -------------------------------------------------------------------

def crosscheck_section(device, sizes, work):
    """One LoSA + head batch through the same weights on the CPU (fp32, the reference) and on
    this device, in fp32 and under bf16 autocast: the relative L2 error of the head's outputs,
    the losses and the gradients (each part over all its tensors), within TOLERANCES.
    Without CUDA the other side is the CPU again (fp32 must then agree exactly)."""
    from training.data import batch_to
    from training.detector import Detector

    # No dropout or drop-path: the two devices' random streams differ.
    config = load_config(CONFIG, ["model.losa.dropout=0", "head.drop_path=0", "head.dropout=0",
                                  *sizes.model_overrides])
    tokens = int(np.prod(PRESET.tokens))
    torch.manual_seed(0)
    reference = Detector(sizes.dim, 20, len(sizes.layers), tokens, config.model, config.head)
    batch = random_batch(2, sizes.cross_length, len(sizes.layers), tokens, sizes.dim, seed=1)
    # fp32 means fp32: no TF32 in the matrix products or convolutions
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    expected = _forward_backward(reference, batch_to(batch, torch.device("cpu"), False), False)
    errors = {}
    for precision, bounds in TOLERANCES.items():
        model = Detector(sizes.dim, 20, len(sizes.layers), tokens, config.model, config.head)
        model.load_state_dict(reference.state_dict())
        low = precision != "fp32"
        got = _forward_backward(model.to(device), batch_to(batch, device, low), low)
        errors[precision] = {part: _relative_error(got[part], expected[part])
                             for part in expected}
        ok = all(errors[precision][part] <= bound for part, bound in bounds.items())
        say("crosscheck", f"{device} against the CPU (fp32), {precision}: relative error "
                          + ", ".join(f"{part} {errors[precision][part]:.1e} (bound "
                                      f"{bound:.0e})" for part, bound in bounds.items())
                          + f": {'within' if ok else 'OUTSIDE'}",
            errors=errors, tolerances=TOLERANCES)
        if not ok:
            raise SystemExit(f"crosscheck: {precision} outside its tolerance")


def _forward_backward(model, batch, low_precision):
    from torch.utils._pytree import tree_leaves

    model.train()
    with torch.autocast(batch["last"].device.type, dtype=torch.bfloat16,
                        enabled=low_precision):
        outputs = model(batch)
        losses = model.loss(outputs, batch)
    losses["total"].backward()
    leaves = [t for t in tree_leaves(outputs)
              if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return {"outputs": {i: t.detach().float().cpu() for i, t in enumerate(leaves)},
            "losses": {k: v.detach().float().cpu() for k, v in losses.items()
                       if isinstance(v, torch.Tensor) and v.is_floating_point()},
            "gradients": {n: p.grad.float().cpu() for n, p in model.named_parameters()
                          if p.grad is not None}}


def _relative_error(got: dict, expected: dict) -> float:
    """||got - expected|| / ||expected||, over all the tensors of a part together."""
    a = torch.cat([got[key].flatten().double() for key in expected])
    b = torch.cat([value.flatten().double() for value in expected.values()])
    return ((a - b).norm() / b.norm()).item() if b.norm() > 0 else (a - b).norm().item()


# -- the loader-fed epoch and the loader ----------------------------------------------------------

def epoch_section(device, sizes, work):
    """``cli.py train`` for one epoch on a generated store (the cache as configured); the
    store stays in the work folder for the loader section."""
    folder = Path(work) / "epoch"
    folder.mkdir(exist_ok=True)
    say("epoch", loader_fed_epoch(str(folder), sizes.epoch_videos, sizes.dim, sizes.length,
                                  sizes.layers, PRESET.tokens, str(CONFIG),
                                  sizes.model_overrides, device))


def loader_section(device, sizes, work):
    from bench import loader

    store = Path(work) / "epoch"
    args = ["--dim", str(sizes.dim), "--length", str(sizes.length),
            "--videos", str(sizes.epoch_videos),
            "--layers", ",".join(map(str, sizes.layers)), *sizes.loader_args]
    if (store / "gt.json").exists():  # the epoch section's store, not another one
        args += ["--store", str(store)]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        figures = loader.main(args)
    for line in printed.getvalue().splitlines():
        say("loader", line.removeprefix("loader: "))
    RESULT.figures.update(figures)
    RESULT.write()


# -- collectives ---------------------------------------------------------------------------------

def collectives_section(device, sizes, work):
    """Every collective losa_distributed.py offers, in a one-process group on this device
    (NCCL on CUDA), then a DDP backward (its gradient all-reduce)."""
    import torch.distributed as dist

    import losa_distributed as distributed

    backend = "nccl" if device.type == "cuda" else "gloo"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        world = distributed.World(rank=0, size=1, device=device, joined=True)
        total = distributed.sum_across(world, torch.tensor([1.5, 2.0], dtype=torch.float64))
        parts = distributed.gather_tensors(world, torch.arange(4))
        gathered = distributed.gather_json(world, {"video": [{"score": 0.5}]})
        distributed.barrier(world)
        model = torch.nn.parallel.DistributedDataParallel(
            torch.nn.Linear(8, 2).to(device),
            device_ids=[device.index] if device.type == "cuda" else None)
        model(torch.ones(3, 8, device=device)).sum().backward()
        assert total.tolist() == [1.5, 2.0] and parts[0].tolist() == [0, 1, 2, 3]
        assert gathered == [{"video": [{"score": 0.5}]}]
        assert model.module.weight.grad.tolist() == [[3.0] * 8] * 2
        say("collectives", f"{backend} one-process group on {device}: all_reduce, all_gather "
                           "(tensors, JSON), barrier and a DDP backward ok",
            backend=backend, collectives=list(COLLECTIVES) + ["DDP backward"])
    finally:
        dist.destroy_process_group()


# -- the demo on this device against the CPU -----------------------------------------------------

def demo_section(device, sizes, work):
    """The demo's LoSA recipe trained from one demo store: once on this device (seed 0) and,
    at the same time, on the CPU with training seeds 0..n-1 (one thread each). The device's
    mAP must land within the CPU seeds' mean +- 2 standard deviations (and their range is
    printed): a device-specific fault (a kernel, a dtype, a sync) shows as a drop."""
    from synth.config import SynthConfig
    from synth.demo import DemoSettings, extract_benchmark
    from synth.generator import ANNOTATION_FILE, generate

    folder = Path(work) / "demo"
    settings = DemoSettings(out=str(folder), synth=SynthConfig(**sizes.demo_synth),
                            progress=False)
    started = time.perf_counter()
    generate(str(folder / "benchmark"), settings.synth, progress=False)
    annotations = folder / "benchmark" / ANNOTATION_FILE
    store = folder / "features.zarr"
    extract_benchmark(folder / "benchmark", store, settings)
    prepared = time.perf_counter() - started
    runs = {f"cpu seed {seed}": ("cpu", seed) for seed in range(sizes.demo_seeds)}
    mine = f"device {device} seed 0"  # the CPU again in the reduced form, run as a device
    runs[mine] = (device.type, 0)
    processes = {}
    for name, (kind, seed) in runs.items():
        environment = {**os.environ, "OMP_NUM_THREADS": "1"}
        if kind == "cpu":
            environment["CUDA_VISIBLE_DEVICES"] = ""
        sets = [f"train.seed={seed}", *sizes.demo_overrides]
        command = [sys.executable, str(ROOT / "cli.py"), "train", "--config", str(DEMO_CONFIG),
                   "--model", "losa", "--store", str(store), "--annotations", str(annotations),
                   "--out", str(folder / _folder_name(name)), "--quiet",
                   *[a for s in sets for a in ("--set", s)]]
        processes[name] = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.PIPE, text=True)
    scores = {}
    for name, process in processes.items():
        _, error = process.communicate()
        if process.returncode:
            raise SystemExit(f"demo: training {name} failed:\n{error[-3000:]}")
        scores[name] = _demo_map(folder / _folder_name(name), store, annotations)
    trained = time.perf_counter() - started - prepared
    cpu = np.array([v for k, v in scores.items() if k.startswith("cpu")])
    low, high = cpu.mean() - 2 * cpu.std(ddof=1), cpu.mean() + 2 * cpu.std(ddof=1)
    ok = low <= scores[mine] <= high
    say("demo", f"LoSA average mAP: {mine} {100 * scores[mine]:.1f}; CPU seeds "
                + ", ".join(f"{100 * v:.1f}" for v in cpu)
                + f" (mean {100 * cpu.mean():.1f}, mean +- 2 sd {100 * low:.1f} to "
                  f"{100 * high:.1f}): {'within' if ok else 'OUTSIDE'}; benchmark and store "
                  f"{prepared:.0f} s, trainings side by side {trained:.0f} s",
        average_map=scores, cpu_band=[low, high], within=bool(ok))
    if not ok:
        raise SystemExit("demo: the device's mAP is outside the CPU seeds' spread")


def _folder_name(run: str) -> str:
    return run.replace(" ", "_").replace(":", "")


def _demo_map(run, store, annotations) -> float:
    from evaluation import evaluate_detections, load_annotations
    from training.infer import infer

    predictions = infer(str(run), str(store), str(annotations), subset="test", device="cpu")
    with warnings.catch_warnings():  # detections of classes absent from the few test videos
        warnings.simplefilter("ignore")
        return evaluate_detections(load_annotations(str(annotations)), predictions,
                                   subset="test").average_mAP


# -- running the sections ------------------------------------------------------------------------

# name -> (function, timeout in seconds on CUDA); the order they run in. The timeouts are about
# twice each section's estimated time on one H100 (docs/gpu_check.md); the reduced form gets
# REDUCED_TIMEOUTS times as long (a busy 2-core machine took 11 to 74 s for one section).
SECTIONS = {
    "device": (device_section, 60),
    "sdpa": (sdpa_section, 120),
    "backbone": (backbone_section, 180),
    "resize": (resize_section, 60),
    "pipeline": (pipeline_section, 180),
    "train": (train_section, 180),
    "crosscheck": (crosscheck_section, 120),
    "epoch": (epoch_section, 180),
    "loader": (loader_section, 120),
    "collectives": (collectives_section, 60),
    "demo": (demo_section, 300),
}
REDUCED_TIMEOUTS = 3


def run_section(name, device, reduced, work, result_path) -> None:
    RESULT.path = Path(result_path)
    RESULT.write()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        SECTIONS[name][0](device, Sizes(reduced), work)
    except BaseException as error:
        RESULT.write(error="".join(traceback.format_exception_only(error)).strip())
        raise


def run_all(args, device, reduced) -> int:
    """Each section in its own process under its own timeout (and what is left of
    ``--budget``); summary.json after each."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.only.split(",") if args.only else list(SECTIONS)
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"--only: no section {', '.join(unknown)} (sections: "
                         f"{', '.join(SECTIONS)})")
    summary = {"started": datetime.datetime.now().isoformat(timespec="seconds"),
               "reduced": reduced, "host": socket.gethostname(), "sections": {}}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        for name in names:
            timeout = SECTIONS[name][1] * (REDUCED_TIMEOUTS if reduced else 1)
            if args.budget:
                timeout = min(timeout, int(args.budget - (time.monotonic() - started)))
            if timeout < 5:
                record = {"status": "skipped (budget spent)", "seconds": 0}
            else:
                record = _run_in_process(name, reduced, work, timeout)
            summary["sections"][name] = record
            print(f"== {name}: {record['status']}, {record['seconds']:.0f} s (timeout "
                  f"{timeout} s)", flush=True)
            summary["seconds"] = round(time.monotonic() - started, 1)
            (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    passed = sum(r["status"] == "ok" for r in summary["sections"].values())
    print(f"gpu_check: {passed} of {len(names)} sections ok in {summary['seconds']:.0f} s; "
          f"summary in {out / 'summary.json'}", flush=True)
    return 0 if passed == len(names) else 1


def _run_in_process(name, reduced, work, timeout) -> dict:
    result = Path(work) / f"{name}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--work", work,
               "--result", str(result)] + (["--reduced"] if reduced else [])
    started = time.monotonic()
    # Its own process group: a timeout ends the section's workers and trainings too.
    process = subprocess.Popen(command, start_new_session=True)
    try:
        code = process.wait(timeout=timeout)
        status = "ok" if code == 0 else f"failed (exit {code})"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        status = "timed out"
    record = json.loads(result.read_text()) if result.exists() else {}
    return {"status": status, "seconds": round(time.monotonic() - started, 1),
            "timeout": timeout, **record}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu_check_out", help="folder for summary.json")
    parser.add_argument("--reduced", action="store_true", help="toy sizes even on CUDA")
    parser.add_argument("--only", metavar="S1,S2", help="these sections only, in this order")
    parser.add_argument("--budget", type=float, metavar="SECONDS",
                        help="stop starting sections after this long; each section's timeout "
                             "is cut to what is left (the device call's limit)")
    parser.add_argument("--cosine-only", type=int, metavar="PX",
                        help="only the ViT-g bf16-vs-fp32 cosine, on 2 clips of PX x PX (the "
                             "docs' CPU figure: 112)")
    parser.add_argument("--resize-only", type=int, metavar="PX",
                        help="only the resize line, to PX x PX (the docs' CPU figure: 224)")
    parser.add_argument("--section", choices=list(SECTIONS), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    reduced = args.reduced or device.type != "cuda"
    if args.section:
        run_section(args.section, device, reduced, args.work, args.result)
        return 0
    if args.cosine_only:
        sizes = Sizes(reduced=False)
        sizes.img_size, sizes.cosine_clips = args.cosine_only, 2
        say("backbone", f"ViT-g random weights, 16x{args.cosine_only}x{args.cosine_only} on "
                        f"{device}: {cosine_line(device, sizes)[0]}")
        return 0
    if args.resize_only:
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as folder:
            say("resize", resize_line(device, args.resize_only, folder))
        return 0
    return run_all(args, device, reduced)


if __name__ == "__main__":
    sys.exit(main())
