"""``store verify``: read every complete video through all of the store's checks."""
from __future__ import annotations

from dataclasses import dataclass, field

from losa_tal import InputError

# Clips read at a time, so a long video with many layers never has to fit in memory at once.
VERIFY_BLOCK_CLIPS = 1024


@dataclass
class VerifyReport:
    checked: int = 0
    bad: dict = field(default_factory=dict)  # video id -> problem
    notes: list = field(default_factory=list)  # things readers ignore but a user should know


def verify_store(fs, progress: bool = False) -> VerifyReport:
    """Check every complete video: record, times (finite, increasing), every layer's shape,
    dtype and values (finite; checksums on every chunk)."""
    from tqdm import tqdm

    report = VerifyReport()
    with tqdm(fs.videos(), desc="verify", unit="video", disable=not progress) as bar:
        for video_id in bar:
            problem = video_problem(fs, video_id)
            if problem is not None:
                report.bad[video_id] = problem
            report.checked += 1
    incomplete = fs.incomplete_videos()
    if incomplete:
        report.notes.append(f"{len(incomplete)} incomplete video(s) ignored by readers (a writer "
                            f"died or is still writing; the next run rewrites them): "
                            f"{', '.join(incomplete[:5])}{' ...' if len(incomplete) > 5 else ''}")
    return report


def video_problem(fs, video_id: str):
    """What is wrong with one complete video, or None."""
    prefix = f"{fs.path}: video {video_id!r}: "
    try:
        num_clips = fs.video_info(video_id)["num_clips"]
        fs.feature_times(video_id)
        for start in range(0, num_clips, VERIFY_BLOCK_CLIPS):
            fs.read(video_id, None, start, min(num_clips, start + VERIFY_BLOCK_CLIPS))
    except InputError as err:
        message = str(err)
        return message[len(prefix):] if message.startswith(prefix) else message
    return None
