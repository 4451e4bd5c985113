"""``store verify``: read every committed video through all of the store's checks, and compare
what the store holds with what it was planned to hold."""
from __future__ import annotations

from dataclasses import dataclass, field

from losa_tal import InputError

from .errors import RemoteFailure
from .parts import part_progress

# Clips read at a time, so a long video with many layers never has to fit in memory at once.
VERIFY_BLOCK_CLIPS = 1024


@dataclass
class VerifyReport:
    checked: int = 0
    bad: dict = field(default_factory=dict)  # video id -> problem
    missing: list = field(default_factory=list)  # planned, not committed, not failed
    # missing videos extracted in parts, some committed: id -> "3 of 5 parts committed"
    partial: dict = field(default_factory=dict)
    failed: dict = field(default_factory=dict)  # planned, not committed: id -> why its source failed
    notes: list = field(default_factory=list)  # things readers ignore but a user should know

    @property
    def clean(self) -> bool:
        return not (self.bad or self.missing)


def verify_store(fs, progress: bool = False) -> VerifyReport:
    """Check every committed video: its commit and record, times (finite, increasing, within
    the recorded duration), every layer's shape, dtype and values (finite; checksums on every
    chunk); then list the planned videos that are not committed: those whose source failed
    (recorded by extraction, with the reason; the store is right not to hold them) apart from
    the missing ones (no run has committed them: the store is incomplete), saying how many
    parts of those extracted in parts are committed."""
    from tqdm import tqdm

    report = VerifyReport()
    committed = fs.videos()
    with tqdm(committed, desc="verify", unit="video", disable=not progress) as bar:
        for video_id in bar:
            problem = video_problem(fs, video_id)
            if problem is not None:
                report.bad[video_id] = problem
            report.checked += 1
    planned = fs.planned_videos()
    if planned is not None:
        absent = set(entry["video_id"] for entry in planned) - set(committed)
        failed = fs.failed_videos()
        report.failed = {vid: failed[vid] for vid in sorted(absent & set(failed))}
        report.missing = sorted(absent - set(failed))
        report.partial = {vid: part_progress(fs, vid, parts) for vid, parts in
                          sorted(fs.committed_parts(report.missing).items())}
    incomplete = fs.incomplete_videos()
    if incomplete:
        report.notes.append(f"{len(incomplete)} uncommitted video(s) ignored by readers (a writer "
                            f"is still writing or died; `store gc` removes dead attempts): "
                            f"{', '.join(incomplete[:5])}{' ...' if len(incomplete) > 5 else ''}")
    return report


def video_problem(fs, video_id: str):
    """What is wrong with one committed video, or None."""
    prefix = f"{fs.path}: video {video_id!r}: "
    try:
        problem = fs.commit_problem(video_id)
        if problem is not None:
            return problem
        if video_id not in fs:
            return "its record names another video (damaged or edited)"
        info = fs.video_info(video_id)
        times = fs.feature_times(video_id)
        problem = duration_problem(fs.meta["protocol"], info, times)
        if problem is not None:
            return problem
        for start in range(0, info["num_clips"], VERIFY_BLOCK_CLIPS):
            fs.read(video_id, None, start, min(info["num_clips"], start + VERIFY_BLOCK_CLIPS))
    except RemoteFailure:
        raise  # the server failed, not the video: stop rather than call every video bad
    except InputError as err:
        message = str(err)
        return message[len(prefix):] if message.startswith(prefix) else message
    return None


def duration_problem(protocol: dict, info: dict, times):
    """A recorded duration that contradicts the feature times (None if they agree or either is
    unknown). The last clip centre lies before the end of the video by about half a clip plus up
    to a stride (one clip more or less for imported features), or past it by up to half a clip in
    a padded video shorter than one clip; anything else means the record or the times were
    damaged or edited."""
    duration, fps = info.get("duration"), info.get("fps")
    if duration is None or fps is None or not len(times):
        return None
    half_clip = protocol.get("clip_len", 0) * protocol.get("frame_interval", 1) / 2
    stride = protocol.get("clip_stride", 0)
    # Above: a video shorter than one clip is padded, its one clip centred past its end.
    if not (duration - (half_clip + 2 * stride + 1) / fps <= times[-1]
            <= duration + (half_clip + stride) / fps):
        return (f"duration {duration:.3f}s contradicts the feature times (last clip centre at "
                f"{times[-1]:.3f}s)")
    return None


def video_length(protocol: dict, info: dict, times) -> float:
    """Seconds of video the features cover: the recorded duration where it agrees with the
    feature times, else the last clip's end as the times say (a wrong duration would cut or
    stretch detections silently)."""
    if info.get("duration") is not None and duration_problem(protocol, info, times) is None:
        return float(info["duration"])
    fps = info.get("fps")
    half_clip = protocol.get("clip_len", 0) * protocol.get("frame_interval", 1) / 2
    return float(times[-1] + (half_clip / fps if fps else 0.0))
