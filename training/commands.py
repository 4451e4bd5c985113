"""``cli.py train`` and ``cli.py infer``. Only click is imported here; torch loads on use."""
import click

from evaluation.commands import FUSE_FLAGS, topk_option, video_scores_option  # no torch
from losa_tal import find_recipe, flag_errors
from store.urls import storage_options_flag
from training.config import MODEL_TYPES, load_config  # no torch

# training.train's names for what these flags give (losa_tal.flag_errors).
STORE_FLAGS = {"store_path": "--store"}
TRAIN_FLAGS = {**STORE_FLAGS, "out_dir": "--out", "resume": "--resume", "model.type": "--model"}
INFER_FLAGS = {**STORE_FLAGS, **FUSE_FLAGS, "subset": "--subset"}


@click.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="Training config (JSON), or a shipped recipe's name: thumos_vitg_losa, "
              "anet_vitg_losa, demo/train (configs/).")
@click.option("--store", "store_path", default=None,
              help="Feature store (default: the config's data.store).")
@click.option("--annotations", "annotations_path", default=None,
              help="Ground-truth JSON (default: the config's data.annotations).")
@click.option("--out", "out_dir", default=None,
              help="Run directory (default: runs/<config name>).")
@click.option("--model", "model_type", type=click.Choice(MODEL_TYPES), default=None,
              help="LoSA adapters + head, or the head-only baseline (overrides model.type).")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Overrides train.epochs.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config value, e.g. --set optim.lr_head=2e-4 (repeatable).")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out from its last checkpoint.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Torch threads per process when training on the CPU  [default: half the "
              "cores, shared by torchrun's local processes]")
@click.option("--tensorboard/--no-tensorboard", default=True, show_default=True,
              help="TensorBoard event files in the run directory (needs the tensorboard extra).")
@click.option("--print-config", is_flag=True,
              help="Print the resolved config (every value, flags applied) and exit.")
@storage_options_flag
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(config_path, store_path, annotations_path, out_dir, model_type, epochs, overrides,
          resume, threads, tensorboard, print_config, storage_options, quiet):
    """Train LoSA adapters and the detection head from a feature store.

    Data parallel: torchrun --standalone --nproc_per_node N cli.py train ... (the global batch
    is shared by the N processes; one line says what changes where it cannot be).
    """
    import dataclasses
    import json
    from pathlib import Path

    overrides = list(overrides)
    if model_type is not None:
        overrides.append(f"model.type={model_type}")
    if epochs is not None:
        overrides.append(f"train.epochs={epochs}")
    config_path = find_recipe(config_path)
    config = load_config(config_path, overrides)  # refuses a bad config before torch loads
    # The run's config.json names the inputs it was trained on, not the recipe's defaults.
    config = dataclasses.replace(config, data=dataclasses.replace(
        config.data, store=store_path or config.data.store,
        annotations=annotations_path or config.data.annotations))
    if print_config:
        click.echo(json.dumps(config.to_dict(), indent=2))
        return
    import losa_distributed
    from training.train import default_cpu_threads
    from training.train import train as run_training

    out_dir = out_dir or str(Path("runs") / Path(config_path).stem)
    with flag_errors(TRAIN_FLAGS):
        summary = run_training(config, store_path, annotations_path, out_dir, resume=resume,
                               progress=not quiet, storage_options=storage_options,
                               cpu_threads=threads or default_cpu_threads(),
                               tensorboard=tensorboard)
    if losa_distributed.launch().is_main:  # under torchrun, the main process reports
        best = summary["best"]
        best_text = (f", best average mAP {best['average_map']:.4f} at epoch {best['epoch']}"
                     if best else "")
        click.echo(f"trained {summary['epoch']} epochs into {summary['run_dir']}{best_text}")


@click.command()
@click.option("--run", "run_dir", default=None, type=click.Path(file_okay=False),
              help="Run directory: uses its best.pt (or last.pt).")
@click.option("--checkpoint", "checkpoint_path", default=None, type=click.Path(dir_okay=False),
              help="A checkpoint file, instead of --run.")
@click.option("--store", "store_path", default=None,
              help="Feature store (default: the run config's data.store).")
@click.option("--annotations", "annotations_path", default=None,
              help="Ground-truth JSON naming the videos and subsets (default: the run's).")
@click.option("--subset", default=None,
              help="Subset to predict (default: the run's eval.subset, else the test split).")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="Predictions JSON to write (ActivityNet format, read by cli.py evaluate).")
@click.option("--device", default=None, help="torch device (default: cuda if available).")
@video_scores_option(required=False)
@topk_option
@storage_options_flag
@click.option("--quiet", is_flag=True, help="No progress bar.")
def infer(run_dir, checkpoint_path, store_path, annotations_path, subset, out_path, device,
          scores_path, topk, storage_options, quiet):
    """Predict action segments for a subset with a trained checkpoint."""
    import losa_distributed
    from losa_tal import InputError
    from training.infer import inference_device
    from training.infer import infer as run_inference

    if (run_dir is None) == (checkpoint_path is None):
        raise InputError("--run/--checkpoint: give exactly one of them")
    with flag_errors(INFER_FLAGS):
        predictions = run_inference(run_dir or checkpoint_path, store_path, annotations_path,
                                    subset, out_path, device=device, progress=not quiet,
                                    video_scores=scores_path, topk=topk,
                                    storage_options=storage_options)
    count = sum(len(v) for v in predictions["results"].values())
    click.echo(f"wrote {count} segments for {len(predictions['results'])} videos to {out_path}; "
               + losa_distributed.device_line(inference_device(device), "predicted"))


@click.command()
@click.argument("video_files", nargs=-1, required=True, metavar="VIDEO...")
@click.option("--run", "run_dir", required=True, type=click.Path(),
              help="Run directory (its best.pt, else last.pt) or a checkpoint file.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for detections.json, a timeline <video>.png per video and the "
              "features cache (features.zarr).")
@click.option("--checkpoint", "backbone_checkpoint", default=None,
              type=click.Path(dir_okay=False), help="The backbone checkpoint (.pth), where it "
              "is no longer where the run's store recorded it.")
@click.option("--device", default=None, help="torch device (default: cuda if available).")
@click.option("--no-figures", is_flag=True, help="Detections only, no timeline figures.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def detect(video_files, run_dir, out_dir, backbone_checkpoint, device, no_figures, quiet):
    """Localise actions in video files with a trained run: stage one with the settings the
    run's features were extracted with (cached in --out: a second call extracts nothing), then
    the run's detector. No annotation or backbone file is needed."""
    from training.detect import detect as run_detection

    with flag_errors({"checkpoint": "--checkpoint", "device": "--device"}):
        written = run_detection(video_files, run_dir, out_dir, backbone_checkpoint, device,
                                progress=not quiet, figures=not no_figures)
    extracted = len(written["extracted"])
    click.echo(f"extracted {extracted} of {len(video_files)} videos (the rest were cached); "
               f"wrote {written['detections']}" +
               "".join(f", {figure}" for figure in written["figures"]))


@click.group()
def convert():
    """Turn another codebase's trained model into a run directory for cli.py infer."""


@convert.command("actionformer")
@click.option("--checkpoint", "checkpoint_path", required=True, type=click.Path(dir_okay=False),
              help="ActionFormer checkpoint (a training checkpoint: its EMA weights are used).")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="The ActionFormer YAML config it was trained with.")
@click.option("--store", "store_path", required=True,
              help="Feature store holding the features it was trained on (cli.py store import).")
@click.option("--annotations", "annotations_path", default=None,
              help="Annotation JSON naming the classes (default: the YAML's dataset.json_file).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Run directory to write (best.pt, config.json).")
@storage_options_flag
def convert_actionformer(checkpoint_path, config_path, store_path, annotations_path, out_dir,
                         storage_options):
    """An official ActionFormer checkpoint and config -> a head-only run directory."""
    from training.convert import convert_actionformer as run_conversion

    with flag_errors({**STORE_FLAGS, "out_dir": "--out"}):
        path = run_conversion(checkpoint_path, config_path, store_path, out_dir,
                              annotations_path, storage_options)
    click.echo(f"wrote {path}; predict with: python cli.py infer --run {out_dir} ...")
