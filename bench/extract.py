#!/usr/bin/env python
"""How fast is stage one, and does decoding hide behind the backbone?

Writes a few synthetic videos (H.264, 320x180 like most THUMOS-14 files; synth/videos.py), then
extracts them three ways in one run, with the same random-init backbone (default ViT-S),
protocol (16-frame clips every 4 frames, 224x224) and layout:

  pipeline      ``run_extraction``: decoding workers, each frame decoded and resized once,
                clips batched across videos, writes into a feature store;
  naive loop    one video at a time in the main process: decode every frame, resize each clip
                as the official TAL script does (each frame four times), encode, write;
  compute only  the backbone alone on as many clips, already in memory.

Then the clip reader alone (open, decode to RGB the frames the clips use, no resize, in CPU
seconds; ``--decode-frames`` frames per video at 29.97 fps, where resampling to 15 fps skips
frames unevenly), at the native rate and at 15 fps, three ways: *before* issue 15 (decord alone,
frames fetched by index: seeks, which land on wrong frames in open-GOP streams), *decord front to
back* (the new reader kept on decord whatever the protocol: it converts every frame it decodes),
and *after* (as the new reader chooses: decord at the native rate, PyAV when frames are skipped).
It prints each time and its ratio to *before*.

Each is run ``--repeats`` times, interleaved, and the fastest run counts (the machine may be
shared). It prints clips/s for each, the pipeline's speed-up over the naive loop, and the ratio
of pipeline time to compute-only time (1.0 = decoding and writing fully hidden; the goal is
<= 1.15). The pipeline's time includes starting its decoding workers (seconds, once per run). With CUDA it also times ViT-g in bf16 (clips/s, peak GPU memory, model-FLOP
utilisation against the device's own dense bf16 peak, SXM and PCIe boards apart) and runs the
real pipeline with ViT-g on CUDA (decoding workers included) next to the backbone alone; without
CUDA, it says those figures were skipped.

    python bench/extract.py [--backbone vit_s] [--videos 2] [--frames 48] [--batch-size 8]
                            [--num-workers 1] [--layers 3,7] [--tokens 2x2x2] [--repeats 3]
                            [--gpu-clips 256] [--decode-frames 600] [--reader-only]
"""
import argparse
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from extract.backbone import build_backbone, count_parameters  # noqa: E402
from extract.decoding import VideoSource, open_video  # noqa: E402
from extract.pipeline import (Encoder, ExtractionSettings, pick_device,  # noqa: E402
                              run_extraction, store_meta, weight_dtype)
from extract.config import ExtractionConfig, parse_tokens  # noqa: E402
from store.protocol import SamplingProtocol  # noqa: E402
from store import FeatureStore  # noqa: E402
from synth.videos import write_video  # noqa: E402

NTSC = 30000 / 1001
# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) for the model-FLOP utilisation figure,
# matched in this order against torch.cuda.get_device_name: the PCIe and NVL boards of a chip
# run slower clocks (and power) than its SXM board.
BF16_PEAK = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12),
             ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("B200", 2250e12),
             ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12)]


def bf16_peak(name: str):
    """The dense bf16 peak of the device named ``name`` (FLOP/s), or None if unknown."""
    return next((value for key, value in BF16_PEAK if key in name), None)


def clip_flops(model, frames=16) -> float:
    """Analytical FLOPs of one clip through the backbone: 2 per multiply-add of every weight
    with every token, plus the attention products (QK^T and AV: 4 N^2 D per block). About
    5.09 TFLOP for ViT-g/14 on 16 x 224 x 224."""
    tokens = int(np.prod(model.token_grid_for(frames, *model.img_size)))
    return 2 * tokens * count_parameters(model) + 4 * len(model.blocks) * tokens ** 2 * \
        model.embed_dim


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="vit_s")
    parser.add_argument("--videos", type=int, default=2)
    parser.add_argument("--frames", type=int, default=48, help="frames per video")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--layers", default="3,7")
    parser.add_argument("--tokens", default="2x2x2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu-clips", type=int, default=256, help="ViT-g clips timed on CUDA")
    parser.add_argument("--decode-frames", type=int, default=600,
                        help="frames per video for the clip-reader timing")
    parser.add_argument("--reader-only", action="store_true", help="only the clip reader")
    return parser.parse_args()


def write_videos(folder, count, frames) -> list:
    videos = []
    for index in range(count):
        path = os.path.join(folder, f"video_{index}.mp4")
        write_video(path, frames, height=180, width=320, seed=index)
        videos.append((f"video_{index}", path))
    return videos


def run_pipeline(settings):
    summary = run_extraction(settings, show_progress=False)
    return summary.clips, summary.seconds


def run_naive(settings, encoder):
    """Decode-then-encode, one video at a time, no workers: the plain script."""
    import decord

    config = settings.config
    protocol, clips_done = config.protocol, 0
    started = time.perf_counter()
    with FeatureStore.create(config.store, store_meta(encoder, config)) as store:
        for video_id, path in settings.videos:
            reader = decord.VideoReader(path, num_threads=1)
            frames = torch.from_numpy(reader.get_batch(list(range(len(reader)))).asnumpy())
            fps = float(reader.get_avg_fps())
            starts = range(0, len(frames) - protocol.clip_len + 1, protocol.clip_stride)
            features = []
            for first in range(0, len(starts), config.batch_size):
                clips = torch.stack([official_clip(frames, s, protocol.img_size)
                                     for s in starts[first:first + config.batch_size]])
                features.append(encoder(clips))
            layers = {layer: torch.cat([torch.from_numpy(f[layer]) for f in features]).numpy()
                      for layer in features[0]}
            info = {"fps": fps, "num_frames": len(frames), "duration": len(frames) / fps}
            store.write_video(video_id, layers, protocol.feature_times(len(frames), fps), info)
            clips_done += len(starts)
    return clips_done, time.perf_counter() - started


def official_clip(frames, start, size):
    """The official TAL transform of one clip: [T, H, W, C] uint8 -> [C, T, S, S] in [0, 1]."""
    clip = frames[start:start + 16].permute(3, 0, 1, 2).float() / 255
    return F.interpolate(clip, size=(size, size), mode="bilinear", align_corners=False)


def seeking_source(path, num_threads=1, every_frame=True):
    """The reader before issue 15: decord alone, every wanted frame fetched by its index."""
    import decord

    reader = decord.VideoReader(str(path), num_threads=num_threads)
    height, width = reader[0].shape[:2]
    source = VideoSource(path=str(path), decoder="decord", num_frames=len(reader),
                         fps=float(reader.get_avg_fps()), height=height, width=width,
                         _reader=reader)

    def by_index(wanted, per_call):
        for begin in range(0, len(wanted), per_call):
            yield reader.get_batch(wanted[begin:begin + per_call]).asnumpy()

    source._read_decord = by_index
    return source


def front_to_back_decord(path, num_threads=1, every_frame=True):
    """The new reader forced onto decord whatever the protocol (what choosing PyAV saves)."""
    return open_video(path, num_threads, every_frame=True)


READERS = {"before (decord, seeks)": seeking_source,
           "decord front to back": front_to_back_decord,
           "after (as chosen)": open_video}


def run_reader(videos, protocol, opener):
    """CPU seconds to open each video and decode the frames its clips use (no resize)."""
    started = time.process_time()
    for _, path in videos:
        source = opener(path, every_frame=protocol.uses_every_frame)
        indices = np.unique(protocol.native_indices(source.num_frames, source.fps,
                                                    source.frame_times))
        for _ in source.read(indices):
            pass
        source.close()
    return time.process_time() - started


def time_readers(folder, args):
    """The clip reader before and after issue 15, at the native rate and at 15 fps."""
    videos = []
    for index in range(args.videos):
        path = os.path.join(folder, f"ntsc_{index}.mp4")
        write_video(path, args.decode_frames, height=180, width=320, fps=NTSC, seed=index)
        videos.append((f"ntsc_{index}", path))
    repeats = 2 * args.repeats - 1
    print(f"clip reader alone (open + decode to RGB, no resize; CPU time, best of {repeats}): "
          f"{args.videos} videos x {args.decode_frames} frames 320x180 H.264 at 29.97 fps")
    for name, protocol in (("native", SamplingProtocol()), ("15 fps", SamplingProtocol(fps=15.0))):
        best = {}
        for _ in range(repeats):
            for label, opener in READERS.items():
                best[label] = min(best.get(label, np.inf), run_reader(videos, protocol, opener))
        before = best["before (decord, seeks)"]
        print(f"  {name}: " + ", ".join(f"{label} {seconds:.3f} s ({seconds / before:.2f}x)"
                                        for label, seconds in best.items()))


def run_compute_only(settings, encoder, num_clips, device=torch.device("cpu")):
    config = settings.config
    size, length = config.protocol.img_size, config.protocol.clip_len
    clips = torch.rand(config.batch_size, 3, length, size, size, device=device)
    if device.type == "cuda":
        encoder(clips)  # warm-up: kernel choice, allocator (nothing comparable on the CPU)
    started = time.perf_counter()
    for first in range(0, num_clips, config.batch_size):
        encoder(clips[:min(config.batch_size, num_clips - first)])  # ends with a D2H copy
    return num_clips, time.perf_counter() - started


def backbone_figures(device, spec="vit_g", batch_size=32, num_clips=256,
                     layers=(7, 15, 23, 31), img_size=224) -> dict:
    """The backbone as extraction runs it (bf16 weights and autocast on CUDA, fp32 on the CPU),
    built on ``device`` with random weights: clips/s, model-FLOP utilisation against the
    device's own bf16 peak, peak memory."""
    torch.manual_seed(0)
    with torch.device(device):  # no fp32 copy on the host first
        model = build_backbone(spec, img_size=img_size)
    model = model.eval().requires_grad_(False).to(device, weight_dtype(device))
    clips = torch.rand(batch_size, 3, 16, img_size, img_size, device=device)
    cuda = device.type == "cuda"
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        model.forward_taps(clips, layers)  # warm-up: kernel choice, allocator
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        started, done = time.perf_counter(), 0
        while done < num_clips:
            model.forward_taps(clips, layers)
            done += batch_size
        if cuda:
            torch.cuda.synchronize(device)
        rate = done / (time.perf_counter() - started)
    flops = clip_flops(model)
    figures = {"backbone": spec if isinstance(spec, str) else json.dumps(spec),
               "precision": "bf16" if cuda else "fp32", "batch": batch_size,
               "img_size": img_size, "clips_per_s": rate, "tflop_per_clip": flops / 1e12}
    if cuda:
        peak = bf16_peak(torch.cuda.get_device_name(device))
        figures.update(device=torch.cuda.get_device_name(device),
                       mfu=rate * flops / peak if peak else None,
                       peak_tflops=peak / 1e12 if peak else None,
                       peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30)
    else:
        figures.update(device=f"CPU ({torch.get_num_threads()} threads)", mfu=None,
                       peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return figures


def backbone_speed(device, spec="vit_g", batch_size=32, num_clips=256, layers=(7, 15, 23, 31),
                   img_size=224) -> str:
    return backbone_line(backbone_figures(device, spec, batch_size, num_clips, layers, img_size))


def backbone_line(f: dict) -> str:
    """:func:`backbone_figures` as one line."""
    if f["mfu"] is not None:
        mfu = f"MFU {100 * f['mfu']:.0f}% of {f['peak_tflops']:.0f} TFLOP/s"
    else:
        mfu = "MFU unknown (device peak not in bench/extract.py)" if "peak_memory_gib" in f \
            else "MFU n/a"
    memory = f"peak memory {f['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in f \
        else f"peak RSS {f['peak_rss_gib']:.1f} GiB"
    return (f"{f['device']}: {f['backbone']} {f['precision']} {f['clips_per_s']:.2f} clips/s "
            f"(batch {f['batch']}, {f['img_size']} px, {f['tflop_per_clip']:.3f} TFLOP per clip), "
            f"{mfu}, {memory}")


def gpu_pipeline(folder, device=torch.device("cuda", 0), backbone="vit_g", frames=600,
                 batch_size=32, num_workers=8, img_size=224):
    """The real pipeline on CUDA (decoding workers included) with ViT-g, on generated videos,
    next to the backbone alone on as many clips: where the pipeline/compute ratio matters."""
    videos = write_videos(folder, 4, frames)
    settings = ExtractionSettings(ExtractionConfig(
        store=os.path.join(folder, "gpu.zarr"), backbone=backbone,
        protocol=SamplingProtocol(img_size=img_size), layers=[7, 15, 23, 31], tokens=[2, 2, 2],
        batch_size=batch_size, num_workers=num_workers, device=str(device)), videos=videos)
    clips, seconds = run_pipeline(settings)
    encoder = Encoder(settings, device)
    _, compute = run_compute_only(settings, encoder, clips, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}: pipeline {backbone} {clips / seconds:.1f} clips/s ({num_workers} decoding "
          f"workers, batch {batch_size}), backbone alone {clips / compute:.1f} clips/s, "
          f"pipeline/compute {seconds / compute:.2f}")


def time_pipeline(args):
    """The pipeline, the naive loop and the backbone alone (the module docstring)."""
    cpu = pick_device("cpu")
    with tempfile.TemporaryDirectory() as folder:
        videos = write_videos(folder, args.videos, args.frames)

        def settings(store):
            return ExtractionSettings(ExtractionConfig(
                store=os.path.join(folder, store), backbone=args.backbone,
                layers=[int(x) for x in args.layers.split(",")],
                tokens=list(parse_tokens(args.tokens)), batch_size=args.batch_size,
                num_workers=args.num_workers, device="cpu"), videos=videos,
                backbone_source="--backbone")

        encoder = Encoder(settings("naive.zarr"), cpu)
        print(f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads): "
              f"{args.backbone} random weights ({count_parameters(encoder.model) / 1e6:.0f} M "
              f"parameters), {args.videos} videos x {args.frames} frames 320x180, 224x224 "
              f"clips, batch {args.batch_size}, layers {args.layers}, tokens {args.tokens}, "
              f"best of {args.repeats}")
        results = {}
        for repeat in range(args.repeats):
            runs = {"pipeline": run_pipeline(settings(f"pipeline{repeat}.zarr")),
                    "naive loop": run_naive(settings(f"naive{repeat}.zarr"), encoder)}
            runs["compute only"] = run_compute_only(settings(""), encoder, runs["pipeline"][0])
            for name, (clips, seconds) in runs.items():
                results[name] = min(results.get(name, (clips, seconds)), (clips, seconds),
                                    key=lambda run: run[1])
    for name, (count, seconds) in results.items():
        print(f"  {name:<13} {count} clips in {seconds:6.1f} s = {count / seconds:6.2f} clips/s")
    pipeline, naive, compute = (results[k][1] / results[k][0] for k in results)
    print(f"  pipeline speed-up over the naive loop: {naive / pipeline:.2f}x")
    print(f"  pipeline time / compute-only time: {pipeline / compute:.2f} (goal <= 1.15; "
          f"{args.num_workers} decoding worker(s) share the CPU with the backbone here)")


def main():
    args = parse_args()
    if not args.reader_only:
        time_pipeline(args)
    with tempfile.TemporaryDirectory() as folder:
        time_readers(folder, args)
    if args.reader_only:
        return
    if torch.cuda.is_available():
        print(backbone_speed(torch.device("cuda", 0), num_clips=args.gpu_clips))
        with tempfile.TemporaryDirectory() as folder:
            gpu_pipeline(folder)
    else:
        print("GPU figures (ViT-g bf16 clips/s, peak memory, MFU) skipped: no CUDA device")


if __name__ == "__main__":
    main()
