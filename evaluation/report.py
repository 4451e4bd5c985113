"""The readable mAP table printed by ``evaluate``."""


def format_report(report: dict, per_class: bool = False) -> str:
    """A plain-text table of a report dict (:meth:`Evaluation.report`), values in percent."""
    thresholds = report["tiou_thresholds"]
    num_gt = report["num_gt"]
    subset = f"subset '{report['subset']}'" if report.get("subset") else "all videos"
    lines = [f"{subset}: {report['num_videos']} videos, {sum(num_gt.values())} ground-truth "
             f"segments in {len(num_gt)} classes, {report['num_detections']} detections"]
    dropped = {k: v for k, v in report.get("gt_dropped", {}).items() if v}
    if dropped:
        lines.append("ground truth dropped: " + ", ".join(f"{v} {k.replace('_', ' ')}"
                                                           for k, v in dropped.items()))
    names = ["mAP (%)"] + (list(report["per_class_AP"]) if per_class else [])
    width = max(len(name) for name in names) + 2
    header = "tIoU".ljust(width) + "".join(f"{t:>8.3g}" for t in thresholds) + f"{'average':>9}"
    lines += [header, _row("mAP (%)", report["mAP"], width)]
    if per_class:
        lines.append("AP per class (%)")
        lines += [_row(name, ap, width) for name, ap in report["per_class_AP"].items()]
    return "\n".join(lines)


def _row(name: str, values, width: int) -> str:
    average = sum(values) / len(values)
    return name.ljust(width) + "".join(f"{100 * v:8.2f}" for v in values) + f"{100 * average:9.2f}"
