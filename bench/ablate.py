#!/usr/bin/env python
"""Ablation of LoSA on the synthetic benchmark: head-only, short-range only, long-range only,
both (LoSA) and LoSA with the zero-gates start, over several training seeds from one store.

    python bench/ablate.py [--out ablate_out] [--seed 0] [--videos 40] [--train-seeds 0,1,2,3,4]
                           [--variants head_only,short,long,losa,losa_gates] [--epochs N]
                           [--no-context] [--quick] [--quiet]

Prints the table (average mAP mean +- std over seeds, AP per class) and writes table.md,
summary.json, ablation.png and sensitivity.png into --out; synth/ablate.py says how. The
benchmark holds the global-context classes unless ``--no-context`` (then it is the demo's). Rerun
with the same --out to resume an interrupted ablation. ``--quick`` (what the test runs): 6 short
videos, seed 0 only, 2 epochs. Cost on the 2-core machine: docs/losa.md.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from losa_tal import InputError, flag_errors, input_error  # noqa: E402
from synth.ablate import (QUICK_EPOCHS, QUICK_SYNTH, VARIANTS, AblationSettings,  # noqa: E402
                          run_ablation, table_markdown)
from synth.config import SynthConfig  # noqa: E402


# The settings these flags give, by the names synth/ablate.py uses (losa_tal.flag_errors).
FLAGS = {"out": "--out", "variants": "--variants", "seed": "--seed", "videos": "--videos"}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="ablate_out")
    parser.add_argument("--seed", type=int, default=0, help="benchmark seed (one store)")
    parser.add_argument("--videos", type=int, help="benchmark size (default: the demo's)")
    parser.add_argument("--train-seeds", help="comma-separated (default 0,1,2,3,4; quick: 0)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--epochs", type=int, help="default: configs/demo/train.json's")
    parser.add_argument("--no-context", action="store_true",
                        help="leave the global-context classes out (the demo's benchmark)")
    parser.add_argument("--quick", action="store_true", help="the test's small run")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def settings_from(args) -> AblationSettings:
    synth = dict(QUICK_SYNTH) if args.quick else {}
    if args.videos is not None:
        synth["videos"] = args.videos
    seeds = args.train_seeds or ("0" if args.quick else "0,1,2,3,4")
    try:
        seeds = tuple(int(s) for s in seeds.split(","))
    except ValueError:
        raise input_error("--train-seeds", f"expected comma-separated integers, got "
                          f"{seeds!r}") from None
    return AblationSettings(
        out=args.out, synth=SynthConfig(seed=args.seed, context=not args.no_context, **synth),
        train_seeds=seeds,
        variants=tuple(args.variants.split(",")),
        epochs=QUICK_EPOCHS if args.quick and args.epochs is None else args.epochs,
        progress=not args.quiet)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        with flag_errors(FLAGS):
            summary = run_ablation(settings_from(args))
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print(table_markdown(summary))
    print(f"written: {args.out}/table.md, summary.json, ablation.png, sensitivity.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
