#!/usr/bin/env python
"""Peak memory of ``infer`` on one long video: does it stay linear in the video's length?

Writes a store holding one video of ``--steps`` feature steps (``--dim``-wide synthetic
features, at most 16, the test suite's generator), converts an ActionFormer checkpoint with THUMOS settings
(512 wide, window 19, 6 levels; random weights) into a run directory, and then runs
``training.infer.infer`` on that video, whole, in a fresh process, on ``--threads`` CPU
threads. It prints the growth of that process's peak resident set during ``infer`` (model
loading, feature reading, the forward pass, post-processing and writing the predictions; not
the imports), measured by tests/helpers/memory.py, and the time it took.

    python bench/infer_memory.py [--steps 120000] [--dim 16] [--threads 2]
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from helpers.memory import peak_growth  # noqa: E402
from helpers.reference_actionformer import PtTransformer  # noqa: E402
from helpers.training import DIM, synthetic_videos, write_annotations, write_store  # noqa: E402

# ActionFormer's THUMOS model settings, in its own config format (cli.py convert actionformer).
YAML = """\
dataset_name: thumos
dataset: {{json_file: {annotations}, num_classes: {classes}, input_dim: {dim}, feat_stride: 4,
          num_frames: 16, max_seq_len: 2304}}
model: {{fpn_type: identity, n_mha_win_size: 19, n_head: 4, embd_dim: 512, fpn_dim: 512,
        head_dim: 512}}
train_cfg: {{init_loss_norm: 100, droppath: 0.1}}
test_cfg: {{pre_nms_topk: 2000, max_seg_num: 200, min_score: 0.001, multiclass_nms: True}}
"""


def prepare(folder: Path, steps: int, dim: int):
    """Store, annotations and run directory of one ``steps``-step video."""
    from click.testing import CliRunner

    import cli

    videos = synthetic_videos(1, "test", num_steps=steps)
    store = write_store(folder / "store.zarr", videos, layers=(), dim=dim)  # first dim columns
    annotations = write_annotations(folder / "gt.json", videos)
    classes = len({a["label"] for video in videos.values() for a in video["annotations"]})
    torch.manual_seed(0)
    weights = PtTransformer(dim, classes).state_dict()
    torch.save({"state_dict_ema": weights}, folder / "af.pth.tar")
    (folder / "af.yaml").write_text(YAML.format(annotations=annotations, classes=classes, dim=dim))
    result = CliRunner().invoke(cli.main, [
        "convert", "actionformer", "--checkpoint", str(folder / "af.pth.tar"), "--config",
        str(folder / "af.yaml"), "--store", str(store), "--out", str(folder / "run")])
    assert result.exit_code == 0, result.output
    return store, annotations, folder / "run"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=120_000)
    parser.add_argument("--dim", type=int, choices=range(1, DIM + 1), default=DIM,
                        metavar=f"1..{DIM}")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        store, annotations, run = prepare(Path(folder), args.steps, args.dim)
        start = time.perf_counter()
        growth = peak_growth(f"""
            import torch
            from training.infer import infer
            torch.set_num_threads({args.threads})
            """, f"""
            predictions = infer({str(run)!r}, {str(store)!r}, {str(annotations)!r}, "test",
                                {str(Path(folder) / "preds.json")!r})
            assert len(predictions["results"]) == 1
            """, timeout=3600)
        seconds = time.perf_counter() - start
    print(f"infer on one video of {args.steps} steps ({args.dim}-d features, THUMOS head, "
          f"{args.threads} threads): peak resident memory grew by {growth / 2**30:.2f} GiB "
          f"({seconds:.0f} s with start-up)")


if __name__ == "__main__":
    main()
