"""Processes that share one store: a writer that appends videos chunk by chunk, a reader that
reads it over and over, and the command prefix that gives a process a read-only view of a folder.
The concurrency and storage campaigns run them as child processes."""
import time

import numpy as np

from store import LAST, FeatureStore

CHUNK, CHUNKS = 8, 4  # clips per write, writes per appended video


def late_features(video_id: str, layers, num_tokens: int, dim: int) -> dict:
    """The features an appending writer publishes for ``video_id``, reproducible from its id."""
    rng = np.random.default_rng(list(video_id.encode()))
    num_clips = CHUNK * CHUNKS
    features = {LAST: rng.normal(size=(num_clips, dim)).astype(np.float32)}
    for layer in layers:
        features[layer] = rng.normal(size=(num_clips, num_tokens, dim)).astype(np.float32)
    return features


def append_videos(location, video_ids, pause: float):
    """Writer process: append each video CHUNK clips at a time, skipping those claimed or done;
    prints ``published <id> <True|False>`` per video it wrote."""
    meta = FeatureStore.open(location).meta
    fs = FeatureStore.create(location, {key: meta[key] for key in (
        "backbone", "protocol", "layers", "tokens", "feature_dim", "dtype")})
    for video_id in video_ids:
        with fs.claim(video_id) as mine:
            if not mine or video_id in fs:
                continue
            features = late_features(video_id, fs.layers, fs.num_tokens, fs.feature_dim)
            num_clips = len(features[LAST])
            times = (np.arange(num_clips) * 4 + 8) / 30.0
            info = {"fps": 30.0, "duration": float(times[-1] + 0.3)}
            with fs.video_writer(video_id, num_clips, info) as writer:
                for start in range(0, num_clips, CHUNK):
                    writer.write(start, {key: values[start:start + CHUNK]
                                         for key, values in features.items()})
                    time.sleep(pause)
                published = writer.commit(times)
            print(f"published {video_id} {published}", flush=True)


def read_while_appended(location, seconds: float):
    """Reader process: list and read every video over and over for ``seconds``; prints one line
    per failed read and ``reads <ok> <failed> <videos seen>`` at the end."""
    ok = failed = seen = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            fs = FeatureStore.open(location)
            listed = fs.videos()
            for video_id in listed:
                fs.read(video_id, [LAST])
            seen = max(seen, len(listed))
            ok += 1
        except Exception as err:  # noqa: BLE001 - every failure is what the test counts
            failed += 1
            print(f"failed: {type(err).__name__}: {err}", flush=True)
    print(f"reads {ok} {failed} {seen}", flush=True)


def read_only_view(directory) -> list:
    """The command prefix that runs a command seeing ``directory`` read-only (a private mount
    namespace with a read-only bind mount: a user without write access to a shared store)."""
    return ["unshare", "-rm", "sh", "-c", 'mount --bind "$0" "$0" && '
            'mount -o remount,bind,ro "$0" "$0" && exec "$@"', str(directory)]
