"""Extraction end to end on real video files: the tiny random-init backbone, the videos and their
settings, the command line that extracts them, and a store's whole contents to compare."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from cli import main
from helpers import REPO
from extract.config import ExtractionConfig
from extract.pipeline import ExtractionSettings
from helpers.videos import write_video
from store import FeatureStore
from store.protocol import SamplingProtocol

TINY = {"embed_dim": 32, "depth": 4, "num_heads": 2, "patch_size": 16}
SIZE = 32
LAYERS = [1, 2]
TOKENS = (2, 2, 1)
# name -> (frames, fps): a few clips, a longer lossy one at 25 fps, one shorter than a clip.
VIDEOS = {"a.mkv": (40, 30), "b.mp4": (70, 25), "c.avi": (10, 30)}


def write_videos(folder, specs=VIDEOS) -> list:
    """The videos, as ``[(video_id, path)]`` sorted."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for seed, (name, (frames, fps)) in enumerate(sorted(specs.items())):
        write_video(folder / name, frames, fps=fps, seed=seed)
    return sorted((Path(name).stem, str(folder / name)) for name in specs)


def settings_for(videos, store, expected_durations=None, **changes) -> ExtractionSettings:
    values = dict(store=str(store), backbone=dict(TINY), protocol=SamplingProtocol(img_size=SIZE),
                  layers=list(LAYERS), tokens=list(TOKENS), batch_size=5, num_workers=0,
                  device="cpu")
    return ExtractionSettings(ExtractionConfig(**{**values, **changes}), videos=videos,
                              expected_durations=expected_durations or {})


def cli_args(videos_dir, store, backbone_file, *extra) -> list:
    return ["extract", "--videos", str(videos_dir), "--out", str(store), "--backbone",
            str(backbone_file), "--random-init", "--img-size", str(SIZE), "--layers",
            ",".join(map(str, LAYERS)), "--tokens", "x".join(map(str, TOKENS)),
            "--batch-size", "5", "--num-workers", "0", "--device", "cpu", "--quiet",
            *map(str, extra)]  # a later repeat of an option wins


def write_backbone_file(folder) -> Path:
    """The tiny backbone as a ``--backbone`` file."""
    path = Path(folder) / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


def start_extract(folder, store, backbone_file, *extra, env=None,
                  program=("cli.py",)) -> subprocess.Popen:
    """``python cli.py extract`` of ``folder`` in batches of 3 clips, as a child process with
    ``env`` as its whole environment (default: this process's); ``program``: what Python runs
    instead of ``cli.py`` (``-c`` and code that runs it)."""
    args = cli_args(folder, store, backbone_file, "--batch-size", 3, *extra)
    return subprocess.Popen([sys.executable, *program, *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# cli.py in a process where flock is refused (Lustre without the flock mount option): every
# claim succeeds, with a warning, so only the work order and the commit keep shards apart.
WITHOUT_LOCKS = ("-c", "import errno, fcntl, runpy, sys\n"
                       "def refused(*args):\n"
                       "    raise OSError(errno.ENOSYS, 'Function not implemented')\n"
                       "fcntl.flock = refused\n"
                       "runpy.run_path('cli.py', run_name='__main__')\n")


def start_shard(folder, store, backbone, *extra, env=None, **options):
    """``start_extract`` whose shard is only what ``env`` or ``extra`` say (this process's
    launcher variables are left out)."""
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith("SLURM_") and key not in ("RANK", "WORLD_SIZE")}
    environment.update({"OMP_NUM_THREADS": "1", **(env or {})})
    return start_extract(folder, store, backbone, *extra, env=environment, **options)


def finish_all(processes, errors=None) -> list:
    """Their outputs, once each ended well; their error outputs go to ``errors``, if given."""
    outputs = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
        outputs.append(stdout)
        if errors is not None:
            errors.append(stderr)
    return outputs


def extracted(stdout) -> int:
    """How many videos an ``extract`` run's summary says it extracted."""
    return int(re.search(r"extracted (\d+) videos", stdout).group(1))


def store_contents(path) -> dict:
    """Everything a reader sees: every video's info, times and layers (float32)."""
    fs = FeatureStore.open(path)
    return {vid: (fs.video_info(vid), fs.feature_times(vid), fs.read(vid)) for vid in fs.videos()}


def assert_same_contents(got: dict, expected: dict):
    assert sorted(got) == sorted(expected)
    for vid, (info, times, layers) in expected.items():
        assert got[vid][0] == info, vid
        assert np.array_equal(got[vid][1], times), vid
        assert sorted(got[vid][2], key=str) == sorted(layers, key=str)
        for layer, values in layers.items():
            assert np.array_equal(got[vid][2][layer], values), (vid, layer)


def run_cli(*args):
    result = CliRunner().invoke(main, [str(arg) for arg in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result
