#!/usr/bin/env python
"""What does a LoSA training step cost on ViT-g-shaped cached features?

Builds the detector of a training config (default: configs/train/thumos_vitg_losa.json) for
ViT-g-shaped store contents in the layout of a dataset preset (default
configs/datasets/thumos.json: D 1408, blocks 7, 15, 23, 31 pooled to K = 2x2x2 tokens; windows
of 2304 feature steps) and times full optimizer steps (forward, focal + DIoU loss, backward,
AdamW, fused on CUDA) on random features with a few ground-truth segments per video. Data
loading is not included in that bare step; ``--epoch-videos N`` (default 8 on CUDA, none on the
CPU) then runs ``cli.py train`` for one epoch on a generated store of N videos of that layout
and reports the loader-fed seconds per step next to the bare one.

On the CPU it runs a reduced batch (default 1 video) and reports the process's peak resident
memory; on each CUDA device it runs the config's batch with bf16 autocast and reports the peak
GPU memory and the seconds one THUMOS-14 epoch would take (200 training videos, an upper bound:
videos shorter than the window are cheaper). The device name is printed with every figure.

    python bench/train.py [--config CONFIG] [--preset thumos] [--layers N] [--tokens K]
                          [--steps 3] [--cpu-steps 1] [--cpu-batch 1] [--length 2304]
                          [--devices cpu,cuda] [--epoch-videos N] [--set k=v ...]
"""
import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from training.config import load_config  # noqa: E402
from training.data import batch_to  # noqa: E402
from training.detector import Detector, parameter_groups, trainable_parameters  # noqa: E402

VITG_DIM = 1408
THUMOS_TRAIN_VIDEOS = 200
NUM_CLASSES = 20


def random_batch(batch, length, num_layers, num_tokens, dim, seed=0):
    """A collated batch of the store's shapes (float32; the model's dtype), all steps valid,
    three segments per video."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.tensor([0.1, 0.4, 0.7]) * length
    segments = torch.stack([starts, starts + torch.tensor([20.0, 60.0, 150.0])], dim=1)
    return {
        "last": torch.randn(batch, length, dim, generator=generator),
        "inter": torch.randn(batch, num_layers, length, num_tokens, dim, generator=generator),
        "mask": torch.ones(batch, length, dtype=torch.bool),
        "targets": [{"segments": segments, "labels": torch.tensor([1, 5, 9])}] * batch,
    }


def time_steps(config, device, batch_size, length, num_tokens, steps, dim=VITG_DIM,
               num_layers=4):
    """Seconds per optimizer step (median of ``steps``) and the peak memory.

    On CUDA one untimed warm-up step comes first (kernel selection, allocator growth); a CPU
    step at full size takes minutes and has nothing comparable to warm up.
    """
    warmup = 1 if device.type == "cuda" else 0
    torch.manual_seed(0)
    model = Detector(dim, NUM_CLASSES, num_layers, num_tokens, config.model,
                     config.head).to(device)
    optimizer = torch.optim.AdamW(parameter_groups(model, config.optim.lr_adapter,
                                                   config.optim.lr_head, config.optim.weight_decay),
                                  fused=device.type == "cuda")  # as training.train does
    low_precision = config.train.amp and device.type == "cuda"
    # Moved (and cast) the way training moves every batch.
    batch = batch_to(random_batch(batch_size, length, num_layers, num_tokens, dim),
                     device, low_precision)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=low_precision)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(warmup + steps):
        started = time.perf_counter()
        with autocast:
            loss = model.loss(model(batch), batch)["total"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    timed = sorted(times[warmup:])
    return timed[len(timed) // 2], peak, trainable_parameters(model)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs/train/thumos_vitg_losa.json"))
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="config override, as for cli.py train")
    parser.add_argument("--preset", default="thumos", help="dataset preset giving the layout")
    parser.add_argument("--layers", type=int, help="intermediate layers (default: the preset's)")
    parser.add_argument("--tokens", type=int,
                        help="pooled tokens K per clip and layer (default: the preset's)")
    parser.add_argument("--epoch-videos", type=int,
                        help="videos of the loader-fed epoch (default 8 on CUDA, 0 on the CPU)")
    parser.add_argument("--length", type=int, default=2304, help="feature steps per window")
    parser.add_argument("--steps", type=int, default=3, help="timed steps on CUDA")
    parser.add_argument("--cpu-steps", type=int, default=1, help="timed steps on the CPU")
    parser.add_argument("--cpu-batch", type=int, default=1, help="videos per step on the CPU")
    parser.add_argument("--devices", default="cpu,cuda",
                        help="comma-separated: cpu, cuda (every visible GPU is skipped if none)")
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    preset = json.loads(open(os.path.join(ROOT, "configs", "datasets",
                                          f"{args.preset}.json")).read())
    num_layers = args.layers or len(preset["layers"])
    tokens = args.tokens or int(np.prod(preset["tokens"]))

    devices = []
    for kind in args.devices.split(","):
        if kind == "cpu":
            devices.append(torch.device("cpu"))
        elif kind == "cuda" and torch.cuda.is_available():
            devices.append(torch.device("cuda", 0))
    losa = dataclasses.asdict(config.model.losa)
    print(f"config {os.path.relpath(args.config, ROOT)} {args.overrides or ''}: "
          f"D {VITG_DIM}, {num_layers} layers x K {tokens} tokens ({args.preset} preset unless "
          f"overridden), {args.length} steps, "
          f"LoSA {losa}")
    for device in devices:
        batch = args.cpu_batch if device.type == "cpu" else config.train.batch_size
        steps = args.cpu_steps if device.type == "cpu" else args.steps
        seconds, peak, params = time_steps(config, device, batch, args.length, tokens, steps,
                                           num_layers=num_layers)
        line = (f"{device_name(device)}: batch {batch}, {seconds:.3f} s/step, "
                f"peak {'GPU memory' if device.type == 'cuda' else 'RSS'} {peak / 2**30:.2f} GiB, "
                f"trainable adapter {params['adapter'] / 1e6:.2f} M + head "
                f"{params['head'] / 1e6:.2f} M")
        if device.type == "cuda":
            epoch = seconds * THUMOS_TRAIN_VIDEOS / batch
            line += f", {epoch:.0f} s per THUMOS-14 epoch ({THUMOS_TRAIN_VIDEOS} videos)"
        print(line, flush=True)
        videos = args.epoch_videos if args.epoch_videos is not None else \
            (8 if device.type == "cuda" else 0)
        if videos:
            with tempfile.TemporaryDirectory(prefix="bench_train_") as folder:
                print(loader_fed_epoch(folder, videos, VITG_DIM, args.length,
                                       preset["layers"][:num_layers], preset["tokens"],
                                       args.config, args.overrides, device), flush=True)
    if not any(d.type == "cuda" for d in devices):
        print("no CUDA device: GPU memory and epoch time not measured")


def loader_fed_epoch(folder, videos, dim, length, layers, tokens, config_path, overrides,
                     device) -> str:
    """``cli.py train`` for one epoch on a generated store of ``videos`` videos of the layout
    (each 1.05 windows long): wall time, and seconds per loader-fed step from the step log."""
    from bench.loader import write_store

    store, annotations = write_store(Path(folder), argparse.Namespace(
        videos=videos, dim=dim, length=length), list(layers), list(tokens))
    sets = [*overrides, "train.epochs=1", "eval.every=0", "data.train_subset=validation",
            "eval.subset=validation", "eval.max_videos=1", f"data.max_seq_len={length}"]
    command = [sys.executable, os.path.join(ROOT, "cli.py"), "train", "--config", config_path,
               "--store", str(store), "--annotations", str(annotations), "--out",
               os.path.join(folder, "run"), "--quiet"] + [a for s in sets for a in ("--set", s)]
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": str(device.index or 0)} \
        if device.type == "cuda" else {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"cli.py train failed:\n{result.stderr[-3000:]}")
    log = [json.loads(line) for line in Path(folder, "run", "log.jsonl").read_text().splitlines()]
    steps = [r["time"] for r in log if r["event"] == "step"]
    per_step = (steps[-1] - steps[0]) / (len(steps) - 1) if len(steps) > 1 else float("nan")
    return (f"loader-fed epoch (cli.py train, {videos} generated videos, {len(steps)} steps, on "
            f"{log[0]['device']}): {seconds:.1f} s wall with start-up and evaluation, "
            f"{per_step:.3f} s per step after the first; {log[0]['cache']}")


if __name__ == "__main__":
    main()
