"""``evaluate``, ``fuse`` and ``visualize``: click commands (heavy imports happen inside them)."""
import click

from losa_tal import flag_errors

from .fusion import TOP_DETECTIONS, TOPK

# The library's names for the values these commands' flags give (losa_tal.flag_errors).
EVALUATE_FLAGS = {"tiou": "--tiou", "dataset": "--dataset", "subset": "--subset"}
FUSE_FLAGS = {"topk": "--topk", "top_detections": "--top-detections"}


preds_option = click.option("--preds", "preds_path", required=True, metavar="PRED.json",
                            help="Detections: {results: {video: [{segment, label, score}]}}.")


def annotations_option(required: bool = True, also: str = ""):
    return click.option("--annotations", "annotations_path", required=required,
                        metavar="GT.json", help="Ground truth in the ActivityNet layout (ActionFormer and OpenTAD "
                        "variants too)" + also + ".")


@click.command()
@preds_option
@annotations_option()
@click.option("--subset", default=None, help="Subset to evaluate (any case). Default: the test split.")
@click.option("--tiou", default=None, metavar="LIST",
              help="tIoU thresholds: '0.3,0.5' or start:stop:step (inclusive).")
@click.option("--dataset", type=click.Choice(["thumos", "anet"], case_sensitive=False),
              default=None, help="Threshold preset: thumos = 0.3:0.7:0.1 (default), "
              "anet = 0.5:0.95:0.05.")
@click.option("--ignore-other-videos", is_flag=True,
              help="Leave out detections on videos outside the subset (default: they count as "
              "false positives, as in the ActivityNet, ActionFormer and OpenTAD evaluators).")
@click.option("--json", "json_path", default=None, metavar="OUT", help="Write the report as JSON.")
@click.option("--per-class", is_flag=True, help="Print AP per class too.")
@click.option("--plot", "plot_dir", default=None, metavar="DIR",
              help="Write per-class AP bars and precision-recall curves (PNG).")
@click.option("--diagnose", "diagnose_dir", default=None, metavar="DIR",
              help="Write a false-positive analysis and mAP sensitivity (PNG + JSON).")
def evaluate(preds_path, annotations_path, subset, tiou, dataset, ignore_other_videos, json_path,
             per_class, plot_dir, diagnose_dir):
    """Score detections against ground truth: mAP per tIoU threshold and the average."""
    from .annotations import load_annotations
    from .files import write_json_atomic
    from .metrics import evaluate_detections
    from .predictions import load_predictions
    from .report import format_report
    from .thresholds import parse_tiou

    with flag_errors(EVALUATE_FLAGS):
        thresholds = parse_tiou(tiou, dataset)
        annotations = load_annotations(annotations_path)
        predictions = load_predictions(preds_path)
        evaluation = evaluate_detections(annotations, predictions, subset, thresholds,
                                         ignore_other_videos)
    report = evaluation.report()
    click.echo(format_report(report, per_class=per_class))
    if json_path:
        write_json_atomic(json_path, report)
    if plot_dir:
        from .plots import write_plots

        _echo_written(write_plots(evaluation, plot_dir))
    if diagnose_dir:
        from .diagnosis import diagnose, write_diagnosis

        _echo_written(write_diagnosis(diagnose(evaluation), diagnose_dir))


def video_scores_option(required: bool):
    return click.option(
        "--video-scores", "scores_path", required=required, metavar="SCORES.json",
        help="Video-level class scores: {results: {video: [C scores]}, class: [C names]} "
        "(CUHK) or {results: {video: {label: score}}}.")


topk_option = click.option("--topk", default=TOPK, show_default=True, type=click.IntRange(min=1),
                           help="Classes per video, those of highest video-level score.")


@click.command()
@preds_option
@video_scores_option(required=True)
@topk_option
@click.option("--top-detections", default=TOP_DETECTIONS, show_default=True,
              type=click.IntRange(min=1), help="Best detections kept per video before fusion.")
@click.option("--out", "out_path", required=True, metavar="OUT.json",
              help="Labelled predictions to write.")
def fuse(preds_path, scores_path, topk, top_detections, out_path):
    """Label class-agnostic detections with video-level class scores (ActivityNet protocol).

    Each kept detection is emitted once per top class, with score sqrt(det x cls).
    """
    from .files import write_json_atomic
    from .fusion import fuse_predictions

    with flag_errors(FUSE_FLAGS):
        fused = fuse_predictions(preds_path, scores_path, topk, top_detections)
    write_json_atomic(out_path, fused, compact=True, durable=True)  # predictions
    count = sum(map(len, fused["results"].values()))
    click.echo(f"wrote {count} detections for {len(fused['results'])} videos to {out_path}")


def _echo_written(paths):
    for path in paths:
        click.echo(f"wrote {path}")


@click.command()
@preds_option
@annotations_option(required=False, also="; without it, detections are drawn as detections")
@click.option("--video", "video_id", required=True, metavar="ID", help="Video id to draw.")
@click.option("--video-file", default=None, metavar="PATH",
              help="The video itself: adds frame thumbnails (decoded with decord).")
@click.option("--out", "out_path", required=True, metavar="PNG", help="Image to write.")
@click.option("--tiou", "tiou_threshold", default=0.5, show_default=True, type=float,
              help="tIoU threshold that decides true and false positives.")
@click.option("--top", default=None, type=int, metavar="N",
              help="Detections to draw, best first (default: max(10, 2 x ground truth)).")
def visualize(preds_path, annotations_path, video_id, video_file, out_path, tiou_threshold, top):
    """Draw one video's timeline: ground truth against detections, TP/FP coloured."""
    from .timeline import plot_timeline

    with flag_errors({"tiou_threshold": "--tiou", "video_file": "--video-file"}):
        path = plot_timeline(annotations_path, preds_path, video_id, out_path, video_file=video_file,
                             tiou_threshold=tiou_threshold, top=top)
    _echo_written([path])
