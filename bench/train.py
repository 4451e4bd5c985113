#!/usr/bin/env python
"""What does a LoSA training step cost on ViT-g-shaped cached features?

Builds the detector of a training config (default: configs/train/thumos_vitg_losa.json) for
ViT-g-shaped store contents (D 1408, 39 intermediate layers of K pooled tokens, windows of 2304
feature steps) and times full optimizer steps (forward, focal + DIoU loss, backward, AdamW) on
random features with a few ground-truth segments per video. Data loading is not included.

On the CPU it runs a reduced batch (default 1 video) and reports the process's peak resident
memory; on each CUDA device it runs the config's batch with bf16 autocast and reports the peak
GPU memory and the seconds one THUMOS-14 epoch would take (200 training videos, an upper bound:
videos shorter than the window are cheaper). The device name is printed with every figure.

    python bench/train.py [--config CONFIG] [--tokens 4] [--steps 3] [--cpu-steps 1]
                          [--cpu-batch 1] [--length 2304] [--devices cpu,cuda] [--set k=v ...]
"""
import argparse
import dataclasses
import os
import resource
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from training.config import load_config  # noqa: E402
from training.data import batch_to  # noqa: E402
from training.detector import Detector, parameter_groups, trainable_parameters  # noqa: E402

VITG_DIM, VITG_LAYERS = 1408, 39
THUMOS_TRAIN_VIDEOS = 200
NUM_CLASSES = 20


def random_batch(batch, length, num_layers, num_tokens, dim, seed=0):
    """A collated batch of the store's shapes (float32, as the store reads), all steps valid,
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


def time_steps(config, device, batch_size, length, num_tokens, steps):
    """Seconds per optimizer step (median of ``steps``) and the peak memory.

    On CUDA one untimed warm-up step comes first (kernel selection, allocator growth); a CPU
    step at full size takes minutes and has nothing comparable to warm up.
    """
    warmup = 1 if device.type == "cuda" else 0
    torch.manual_seed(0)
    model = Detector(VITG_DIM, NUM_CLASSES, VITG_LAYERS, num_tokens, config.model,
                     config.head).to(device)
    optimizer = torch.optim.AdamW(parameter_groups(model, config.optim.lr_adapter,
                                                   config.optim.lr_head, config.optim.weight_decay))
    low_precision = config.train.amp and device.type == "cuda"
    # Moved (and cast) the way training moves every batch.
    batch = batch_to(random_batch(batch_size, length, VITG_LAYERS, num_tokens, VITG_DIM),
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
    parser.add_argument("--tokens", type=int, default=4, help="pooled tokens K per clip and layer")
    parser.add_argument("--length", type=int, default=2304, help="feature steps per window")
    parser.add_argument("--steps", type=int, default=3, help="timed steps on CUDA")
    parser.add_argument("--cpu-steps", type=int, default=1, help="timed steps on the CPU")
    parser.add_argument("--cpu-batch", type=int, default=1, help="videos per step on the CPU")
    parser.add_argument("--devices", default="cpu,cuda",
                        help="comma-separated: cpu, cuda (every visible GPU is skipped if none)")
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)

    devices = []
    for kind in args.devices.split(","):
        if kind == "cpu":
            devices.append(torch.device("cpu"))
        elif kind == "cuda" and torch.cuda.is_available():
            devices.append(torch.device("cuda", 0))
    losa = dataclasses.asdict(config.model.losa)
    print(f"config {os.path.relpath(args.config, ROOT)} {args.overrides or ''}: "
          f"D {VITG_DIM}, {VITG_LAYERS} layers x K {args.tokens} tokens, {args.length} steps, "
          f"LoSA {losa}")
    for device in devices:
        batch = args.cpu_batch if device.type == "cpu" else config.train.batch_size
        steps = args.cpu_steps if device.type == "cpu" else args.steps
        seconds, peak, params = time_steps(config, device, batch, args.length, args.tokens, steps)
        line = (f"{device_name(device)}: batch {batch}, {seconds:.3f} s/step, "
                f"peak {'GPU memory' if device.type == 'cuda' else 'RSS'} {peak / 2**30:.2f} GiB, "
                f"trainable adapter {params['adapter'] / 1e6:.2f} M + head "
                f"{params['head'] / 1e6:.2f} M")
        if device.type == "cuda":
            epoch = seconds * THUMOS_TRAIN_VIDEOS / batch
            line += f", {epoch:.0f} s per THUMOS-14 epoch ({THUMOS_TRAIN_VIDEOS} videos)"
        print(line, flush=True)
    if not any(d.type == "cuda" for d in devices):
        print("no CUDA device: GPU memory and epoch time not measured")


if __name__ == "__main__":
    main()
