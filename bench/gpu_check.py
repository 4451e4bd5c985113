#!/usr/bin/env python
"""The GPU check: one run that says whether this machine trains and extracts as it should.

Run by ``bench/gpu_check.sh`` (``make gpu-check``). On one H100/H200 it takes a few minutes and
prints, each on its own line prefixed by its section:

  device      the device, its memory, torch / CUDA / cuDNN / Python versions;
  sdpa        which scaled-dot-product-attention kernel each attention call uses (backbone,
              LoSA's short- and long-range adapters, the head's local attention);
  backbone    ViT-g in bf16 (bf16 weights, autocast): clips/s, MFU against the device's own
              bf16 peak (SXM and PCIe differ), peak memory; and the bf16-vs-fp32 cosine of the
              stored features (last layer and pooled tokens) on the same clips;
  resize      ``--resize-on device`` against the official CPU transform on a decoded 320x180
              video: max abs pixel difference and the feature cosine on a small random ViT;
  pipeline    the real extraction pipeline (decoding workers included) on generated 320x180
              videos: clips/s, and its ratio to the backbone alone;
  train       one LoSA step (with and without ``checkpoint_layers``) and one head-only step of
              the default config on the default layout: seconds and ``max_memory_allocated``;
  epoch       a one-epoch ``cli.py train`` on a generated store of the default layout;
  collectives a one-process NCCL group running every collective the training uses (through
              losa_distributed.py) and a DDP backward.

Without CUDA (or with ``--reduced``) every section runs at toy sizes on the CPU (gloo for the
group), so CI runs this script end to end; its figures then say nothing about speed.
"""
import argparse
import os
import platform
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.extract import backbone_speed, bf16_peak, clip_flops  # noqa: E402
from bench.train import loader_fed_epoch, time_steps  # noqa: E402
from extract.backbone import build_backbone  # noqa: E402
from extract.config import ExtractionConfig, load_preset  # noqa: E402
from training.config import load_config  # noqa: E402

PRESET = load_preset("thumos")  # the default ViT-g layout
CONFIG = ROOT / "configs" / "train" / "thumos_vitg_losa.json"
GIB = 2 ** 30


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
        self.epoch_videos = 4 if reduced else 8  # two steps at batch 2: one after the first
        self.model_overrides = ["head.embed_dim=32", "head.num_heads=2",
                                "model.losa.bottleneck=16", "model.losa.num_heads=2"] \
            if reduced else []


def say(section, text):
    print(f"{section}: {text}", flush=True)


def device_section(device):
    versions = (f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
                f"{torch.backends.cudnn.version()}, Python {platform.python_version()}")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        say("device", f"{props.name}, {props.total_memory / GIB:.0f} GiB, compute capability "
                      f"{props.major}.{props.minor}, bf16 peak "
                      f"{(bf16_peak(props.name) or 0) / 1e12:.0f} TFLOP/s; {versions}")
    else:
        say("device", f"CPU only ({os.cpu_count()} cores): reduced check; {versions}")


# -- SDPA kernels --------------------------------------------------------------------------------

def sdpa_section(device, sizes):
    """Record each attention call of one forward, then find the kernel SDPA picks for it: the
    first, in the dispatcher's order, that accepts the call on its own."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    calls = {}
    real = F.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, *args, **kwargs):
        caller = sys._getframe(1).f_globals["__name__"]  # extract.backbone, adapt.losa, ...
        calls.setdefault((caller, tuple(query.shape), tuple(key.shape)),
                         (query, key, value, attn_mask, args, kwargs))
        return real(query, key, value, attn_mask, *args, **kwargs)

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    F.scaled_dot_product_attention = recording
    try:
        with torch.inference_mode(), autocast:  # as extraction runs it
            model = build_backbone(sizes.backbone, img_size=sizes.img_size).to(device, dtype)
            model.forward_taps(torch.rand(1, 3, 16, sizes.img_size, sizes.img_size,
                                          device=device, dtype=dtype), sizes.layers)
        detector, batch = _detector_and_batch(device, sizes, "losa", length=256)
        with autocast:  # as training runs it: train mode (dropout), gradients on
            detector.train()(batch)
    finally:
        F.scaled_dot_product_attention = real
    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
    for (name, _, _), (query, key, value, mask, args, kwargs) in calls.items():
        chosen = "none"
        for backend in order:
            try:
                with sdpa_kernel([backend]), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # each refusal also warns why
                    real(query, key, value, mask, *args, **kwargs)
            except RuntimeError:
                continue
            chosen = backend.name.lower()
            break
        say("sdpa", f"{name}: {chosen} (q {tuple(query.shape)}, k {tuple(key.shape)}, "
                    f"{str(query.dtype)[6:]}, {'mask' if mask is not None else 'no mask'})")


def _detector_and_batch(device, sizes, model_type, length, batch_size=1, overrides=()):
    from bench.train import random_batch
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

def backbone_section(device, sizes):
    say("backbone", backbone_speed(device, sizes.backbone, sizes.batch, sizes.clips,
                                   sizes.layers, sizes.img_size))
    say("backbone", cosine_line(device, sizes))


def cosine_line(device, sizes):
    """bf16 (bf16 weights, autocast) against fp32 on the same random-weight model and clips."""
    from extract.pooling import pool_tokens

    torch.manual_seed(0)
    exact = build_backbone(sizes.backbone, img_size=sizes.img_size).eval().to(device)
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
    return (f"bf16 vs fp32 stored features, 1 - cosine of the worst of {len(clips)} clips: last "
            f"layer {1 - cosines[0]:.1e}, pooled tokens of blocks {sizes.layers}: "
            + ", ".join(f"{1 - c:.1e}" for c in cosines[1:]))


# -- the resize on the device ---------------------------------------------------------------------

def resize_section(device, img_size, folder):
    os.makedirs(folder, exist_ok=True)
    say("resize", resize_line(device, img_size, folder))


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

def pipeline_section(device, sizes, folder):
    from bench.extract import write_videos
    from extract.pipeline import ExtractionSettings, run_extraction
    from store.protocol import SamplingProtocol

    videos = write_videos(folder, sizes.videos, sizes.frames)
    settings = ExtractionSettings(ExtractionConfig(
        store=os.path.join(folder, "pipeline.zarr"), backbone=sizes.backbone,
        protocol=SamplingProtocol(img_size=sizes.img_size), layers=sizes.layers,
        tokens=PRESET.tokens, batch_size=sizes.batch, num_workers=sizes.workers,
        device=str(device)), videos=videos)
    summary = run_extraction(settings, show_progress=False)
    say("pipeline", f"{summary.clips} clips of {len(videos)} generated 320x180 videos in "
                    f"{summary.seconds:.1f} s = {summary.clips / summary.seconds:.1f} clips/s "
                    f"({sizes.workers} decoding workers, batch {sizes.batch}, worker start-up "
                    "included)")


# -- training ------------------------------------------------------------------------------------

def train_section(device, sizes):
    batch = load_config(CONFIG).train.batch_size
    tokens = int(np.prod(PRESET.tokens))
    for name, overrides in (("LoSA", []),
                            ("LoSA checkpoint_layers", ["model.losa.checkpoint_layers=true"]),
                            ("head-only", ["model.type=head_only"])):
        config = load_config(CONFIG, overrides + sizes.model_overrides)
        seconds, peak, _ = time_steps(config, device, batch, sizes.length, tokens,
                                      steps=1 if sizes.reduced else 3, dim=sizes.dim,
                                      num_layers=len(sizes.layers))
        memory = (f"max_memory_allocated {peak / GIB:.2f} GiB" if device.type == "cuda"
                  else f"peak RSS {peak / GIB:.2f} GiB")
        say("train", f"{name}: {seconds:.3f} s/step, {memory} (batch {batch}, {sizes.length} "
                     f"steps, {len(sizes.layers)} layers x K {tokens}, D {sizes.dim})")


def epoch_section(device, sizes, folder):
    """``cli.py train`` for one epoch on a generated store (the cache as configured)."""
    say("epoch", loader_fed_epoch(folder, sizes.epoch_videos, sizes.dim, sizes.length,
                                  sizes.layers, PRESET.tokens, str(CONFIG),
                                  sizes.model_overrides, device))


# -- collectives ---------------------------------------------------------------------------------

def collectives_section(device):
    """Every collective losa_distributed.py offers, in a one-process group on this device
    (NCCL on CUDA), then a DDP backward (its gradient all-reduce)."""
    import torch.distributed as dist

    import losa_distributed as distributed

    backend = "nccl" if device.type == "cuda" else "gloo"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
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
        say("collectives", f"{backend} one-process group on {device}: all_reduce, all_gather "
                           "(tensors, JSON), barrier and a DDP backward ok")
    finally:
        dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reduced", action="store_true", help="toy sizes even on CUDA")
    parser.add_argument("--cosine-only", type=int, metavar="PX",
                        help="only the ViT-g bf16-vs-fp32 cosine, on 2 clips of PX x PX (the "
                             "docs' CPU figure: 112)")
    parser.add_argument("--resize-only", type=int, metavar="PX",
                        help="only the resize line, to PX x PX (the docs' CPU figure: 224)")
    args = parser.parse_args()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.cosine_only:
        sizes = Sizes(reduced=False)
        sizes.img_size, sizes.cosine_clips = args.cosine_only, 2
        say("backbone", f"ViT-g random weights, 16x{args.cosine_only}x{args.cosine_only} on "
                        f"{device}: {cosine_line(device, sizes)}")
        return
    if args.resize_only:
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as folder:
            resize_section(device, args.resize_only, folder)
        return
    sizes = Sizes(args.reduced or device.type != "cuda")
    started = time.perf_counter()
    device_section(device)
    sdpa_section(device, sizes)
    backbone_section(device, sizes)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as folder:
        resize_section(device, sizes.img_size, os.path.join(folder, "resize"))
        pipeline_section(device, sizes, folder)
        train_section(device, sizes)
        epoch_section(device, sizes, folder)
    collectives_section(device)
    say("done", f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
