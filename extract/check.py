"""``videos check``: will every video of a folder be extracted right? Asked before the GPU-days.

For each video: does it open (and if not, why), its codec and container, the frames decord
counts against the frames a sequential decode delivers, the container's average frame rate
against the rate its timestamps show (variable or not), the decoded duration against the
annotation, and a frame-accuracy probe: a few clips read as extraction reads them, compared
pixel for pixel with the same frames of a plain sequential PyAV decode.

Each video gets a status and a one-line reason:
  ok       extracted right (the reason says what was handled, e.g. AV1 read by PyAV);
  warning  extracted right, but worth a look (longer than annotated);
  wrong    would be extracted wrongly (probe mismatch, fewer frames decoded than listed,
           shorter than annotated: a truncated file);
  fails    would be skipped (does not open or does not decode).
"""
from __future__ import annotations

import numpy as np

from extract.decoding import VideoError, open_decord, open_video, probe
from store.protocol import SamplingProtocol

BAD = ("wrong", "fails")
PROBE_CLIPS = 3
# A decoded video this much shorter than annotated is reported: seconds, and fraction of it.
SHORT_TOLERANCE_S = 1.0
SHORT_TOLERANCE = 0.02


def duration_tolerance(expected: float) -> float:
    return max(SHORT_TOLERANCE_S, SHORT_TOLERANCE * expected)


def short_duration(decoded: float, expected: float | None) -> str | None:
    """The problem, when a video decodes clearly shorter than annotated (a download cut short
    in a container without an index decodes up to the cut, silently); else None."""
    if expected and decoded < expected - duration_tolerance(expected):
        return (f"decodes to {decoded:.2f} s but the annotations say {expected:.2f} s "
                "(a truncated file?)")
    return None


def check_video(video_id: str, path, protocol: SamplingProtocol,
                expected_duration: float | None = None, probe_clips: int = PROBE_CLIPS) -> dict:
    """The report of one video (see the module docstring)."""
    record = {"video": video_id, "file": str(path), "status": "ok", "reason": "",
              "codec": None, "container": None, "decoder": None, "frames_counted": None,
              "frames_shown": None, "frames_decoded": None, "fps_average": None,
              "fps_measured": None, "frame_rate": None, "duration": None,
              "annotated_duration": expected_duration, "probe_frames": 0,
              "probe_mismatches": None}
    try:
        found = probe(path)
        record.update(codec=found.codec, container=found.container,
                      frames_shown=found.num_frames, fps_average=found.average_fps,
                      fps_measured=found.measured_fps,
                      frame_rate="variable" if found.variable_rate else "constant")
        reader = open_decord(path)
        record["frames_counted"] = len(reader) if reader is not None else None
        del reader
        source = open_video(path, every_frame=protocol.uses_every_frame)
    except VideoError as err:
        return {**record, "status": "fails", "reason": str(err)}
    try:
        record.update(decoder=source.info["decoder"], duration=source.info["duration"])
        record.update(_accuracy_probe(source, protocol, probe_clips))
    except VideoError as err:
        return {**record, "status": "fails", "reason": str(err)}
    finally:
        source.close()
    record["status"], record["reason"] = _verdict(record, found, protocol.uses_every_frame)
    return record


def _accuracy_probe(source, protocol: SamplingProtocol, probe_clips: int) -> dict:
    """A few clips (first, middle, last) read as extraction reads them, against a sequential
    PyAV decode of the whole file (which also counts the frames it delivers)."""
    indices = protocol.native_indices(source.num_frames, source.fps, source.frame_times)
    picks = np.unique(np.linspace(0, len(indices) - 1, min(probe_clips, len(indices)))
                      .round().astype(int))
    wanted = np.unique(indices[picks])
    read = np.concatenate(list(source.read(wanted)))
    truth, decoded = _sequential_frames(source.path, wanted)
    mismatches = sum(1 for i, frame in enumerate(read)
                     if i >= len(truth) or not np.array_equal(frame, truth[i]))
    return {"frames_decoded": decoded, "probe_frames": len(wanted),
            "probe_mismatches": mismatches}


def _sequential_frames(path, wanted) -> tuple[list, int]:
    """The wanted frames of a plain front-to-back PyAV decode, and how many frames it gave."""
    import av

    keep, frames, count = set(int(i) for i in wanted), [], 0
    try:
        with av.open(str(path)) as container:
            for count, frame in enumerate(container.decode(video=0), start=1):
                if count - 1 in keep:
                    frames.append(frame.to_ndarray(format="rgb24"))
    except Exception:  # a decode error mid-file: the count says how far it got
        pass
    return frames, count


def _verdict(record: dict, found, every_frame: bool) -> tuple[str, str]:
    """(status, one-line reason) from a filled-in record."""
    shown, decoded = record["frames_shown"], record["frames_decoded"]
    if record["probe_mismatches"]:
        return "wrong", (f"{record['probe_mismatches']} of {record['probe_frames']} probed "
                         f"frames differ from a sequential decode")
    if decoded < shown:
        return "wrong", f"decodes {decoded} frames, the container lists {shown}"
    expected, duration = record["annotated_duration"], record["duration"]
    truncated = short_duration(duration, expected)
    if truncated:
        return "wrong", truncated
    notes = []
    if record["frames_counted"] is None:
        notes.append(f"decord cannot open {record['codec']}; read by PyAV")
    elif found.hidden:
        notes.append(f"edit list hides {found.hidden} frames (decord counts "
                     f"{record['frames_counted']}, {shown} shown); read by PyAV")
    elif found.undecodable:
        notes.append(f"cut before its first keyframe: {found.undecodable} frames never decode "
                     f"(decord counts {record['frames_counted']}, {shown} shown); read by PyAV")
    if record["decoder"]["name"] == "pyav" and not notes and record["frame_rate"] != "variable" \
            and every_frame:  # else PyAV reads every video (decoding.py)
        notes.append("decord fails on its frames; read by PyAV")
    if record["frame_rate"] == "variable":
        notes.append(f"variable frame rate ({_rate(record['fps_average'])} fps reported, "
                     f"{_rate(record['fps_measured'])} measured); times from timestamps")
    if expected and duration > expected + duration_tolerance(expected):
        return "warning", "; ".join(notes + [f"decodes to {duration:.2f} s but the annotations "
                                             f"say {expected:.2f} s"])
    return "ok", "; ".join(notes)


def _rate(value) -> str:
    return "?" if value is None else f"{value:.2f}"


COLUMNS = ("video", "status", "codec/container", "decoder", "frames counted/decoded",
           "fps avg/measured", "duration/annotated", "probe", "reason")


def table_rows(records: list) -> list:
    """The rows of the printed table, one per video, as strings."""
    rows = []
    for r in records:
        decoder = r["decoder"]["name"] if r["decoder"] else "-"
        rate = "-" if r["fps_average"] is None and r["fps_measured"] is None else \
            f"{_rate(r['fps_average'])}/{_rate(r['fps_measured'])}" + \
            (" VFR" if r["frame_rate"] == "variable" else "")
        duration = "-" if r["duration"] is None else f"{r['duration']:.2f}s" + \
            (f"/{r['annotated_duration']:.2f}s" if r["annotated_duration"] else "")
        probe_text = "-" if r["probe_mismatches"] is None else \
            f"{r['probe_frames'] - r['probe_mismatches']}/{r['probe_frames']} exact"
        rows.append([r["video"], r["status"], f"{r['codec'] or '-'}/{r['container'] or '-'}",
                     decoder, f"{_count(r['frames_counted'])}/{_count(r['frames_decoded'])}",
                     rate, duration, probe_text, r["reason"] or "-"])
    return rows


def _count(value) -> str:
    return "-" if value is None else str(value)


def format_table(records: list) -> str:
    rows = [list(COLUMNS), *table_rows(records)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) +
                     "  " + row[-1] for row in rows).rstrip()
