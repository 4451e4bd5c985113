"""Feature stores written through the store API from reproducible random features: the metadata,
features, times and info of a video of N clips, what an fp16 store gives back, and a writer that
runs a plan of videos (the store-fault tests run it as a child process)."""
import contextlib
import json
import os
import time
from pathlib import Path

import numpy as np

from store import LAST, FeatureStore
from store.names import encode_video_id
from store.protocol import SamplingProtocol

D, K = 8, 4
LAYERS = [2, 5]
CHUNK = 10  # clips per write of run_plan
# Path-like, reserved, non-ASCII, overlong and otherwise hostile video ids.
HOSTILE_IDS = ["../x", "/etc/passwd", "a/b", ".", "..", "~", "%41", "_x", "vidéo 日本 🎬",
               "x" * 300, "y" * 300, "back\\slash", "new\nline", "video_test_0000004"]


def make_meta(**changes) -> dict:
    meta = {
        "backbone": {"preset": "vit_s", "kwargs": {"depth": 6},
                     "checkpoint": {"file": "vit_s.pth", "sha256": "ab" * 32},
                     "random_init_seed": None},
        "protocol": SamplingProtocol().to_dict(),
        "layers": list(LAYERS), "tokens": [1, 2, 2], "feature_dim": D,
    }
    meta.update(changes)
    return meta


def video_features(seed: int, num_clips: int, layers=LAYERS) -> dict:
    rng = np.random.default_rng(seed)
    features = {LAST: rng.standard_normal((num_clips, D)).astype(np.float32)}
    for layer in layers:
        features[layer] = rng.standard_normal((num_clips, K, D)).astype(np.float32)
    return features


def clip_times(num_clips: int, fps: float = 30.0) -> np.ndarray:
    return SamplingProtocol().feature_times(16 + 4 * (num_clips - 1), fps)


def video_info(num_clips: int, fps: float = 30.0) -> dict:
    num_frames = 16 + 4 * (num_clips - 1)
    return {"fps": fps, "num_frames": num_frames, "duration": num_frames / fps}


def write_video(fs, video_id, seed, num_clips) -> dict:
    features = video_features(seed, num_clips, fs.layers)
    assert fs.write_video(video_id, features, clip_times(num_clips), video_info(num_clips))
    return features


def as_stored(values: np.ndarray) -> np.ndarray:
    """What an fp16 store gives back for these values."""
    return values.astype(np.float16).astype(np.float32)


def assert_video_equals(fs, video_id, features):
    read = fs.read(video_id)
    assert sorted(read, key=str) == sorted(features, key=str)
    for layer, values in features.items():
        assert read[layer].dtype == np.float32
        np.testing.assert_array_equal(read[layer], as_stored(values))
    np.testing.assert_array_equal(fs.feature_times(video_id), clip_times(len(features[LAST])))


def files_under(directory) -> set:
    return {os.path.join(root, name) for root, _, names in os.walk(directory) for name in names}


def run_plan(location, plan, pause=0.0, use_claims=True):
    """Write each (video id, seed, clips) of the plan CHUNK clips at a time, skipping videos that
    are done or claimed by another writer; one line on stdout per step."""
    fs = FeatureStore.create(location, make_meta())
    for video_id, seed, num_clips in plan:
        with (fs.claim(video_id) if use_claims else contextlib.nullcontext(True)) as mine:
            if not mine or video_id in fs:
                continue
            features = video_features(seed, num_clips)
            with fs.video_writer(video_id, num_clips, video_info(num_clips)) as writer:
                for start in range(0, num_clips, CHUNK):
                    writer.write(start, {key: values[start:start + CHUNK]
                                         for key, values in features.items()})
                    print(f"chunk {video_id} {start}", flush=True)
                    time.sleep(pause)
                published = writer.commit(clip_times(num_clips))
            print(f"published {video_id} {published}", flush=True)
    fs.close()


# -- the Zarr layout on disk (format 2), for tests that damage or inspect it ------------------------
def commit_path(location, video_id) -> Path:
    return Path(location) / "commits" / encode_video_id(video_id)


def video_dir(location, video_id) -> Path:
    """The folder of a committed video's arrays (the attempt its commit record names)."""
    return Path(location) / json.loads(commit_path(location, video_id).read_text())["path"]


def edit_record(location, video, **changes):
    """Change fields of a committed video's record, as a hand edit or damage would."""
    path = commit_path(location, video)
    document = json.loads(path.read_text())
    document["record"].update(changes)
    path.write_text(json.dumps(document))


def uncommitted(location) -> list[str]:
    """What writers left that no reader sees: Zarr attempts no commit names, HDF5 staging files."""
    location = str(location)
    if location.endswith(".h5"):
        staging = location + ".writers/staging"
        return sorted(name for name in os.listdir(staging) if not name.endswith(".lock"))
    root = Path(location)
    used = {json.loads(path.read_text())["path"] for path in (root / "commits").glob("*")}
    attempts = [f"attempts/{name.name}/{attempt.name}" for name in (root / "attempts").glob("*")
                for attempt in name.iterdir()]
    return sorted(set(attempts) - used)
