"""The children of the full-disk and read-only campaign (tests/test_reliability_storage.py): each
runs in a private mount namespace (``unshare -rm``), mounts a small tmpfs, fills it or remounts it
read-only, runs the commands into it and prints what it saw as JSON lines for the tests to judge."""
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import REPO, TESTS_DIR

SIZE = "16m"  # the tmpfs: room for a dozen checkpoints of the tiny detector


def fill(directory: Path, leave: int = 0) -> Path:
    """Write a filler file until the file system has not one byte left, then give back
    ``leave`` bytes: a write larger than that then fails part way through."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as handle:
        for block in (1 << 16, 1 << 12, 1 << 8, 1):
            try:
                while True:
                    handle.write(b"\0" * block)
            except OSError as err:
                assert err.errno == errno.ENOSPC, err
        handle.truncate(handle.tell() - leave)
    return filler


def snapshot(directory: Path) -> dict:
    """{relative path: bytes} of every file under ``directory``."""
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != "filler"}


def child(work: str):
    """Runs in the private mount namespace; prints one JSON line per scenario."""
    sys.path[:0] = [str(TESTS_DIR), str(REPO)]
    import numpy as np
    import torch
    from click.testing import CliRunner

    import cli
    import training.checkpoint as ckpt
    from helpers.training import (final_weights, synthetic_videos, tiny_config, write_annotations,
                                  write_config, write_store)

    work = Path(work)
    mnt = work / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(mnt)], check=True)
    videos = {**synthetic_videos(4, "training"), **synthetic_videos(1, "validation", first=4)}
    store = write_store(work / "store.zarr", videos)
    annotations = write_annotations(work / "gt.json", videos)
    config = write_config(work / "config.json", tiny_config(train={"epochs": 2}))
    features = work / "features"
    features.mkdir()
    for index in range(3):
        np.save(features / f"v{index}.npy", np.full((8, 4), index, dtype=np.float32))

    def cli_run(*args):
        result = CliRunner().invoke(cli.main, [str(a) for a in args])
        return {"exit": result.exit_code, "stderr": result.stderr,
                "exception": None if result.exit_code in (0, 2) else repr(result.exception)}

    def train(out, *extra):
        return cli_run("train", "--config", config, "--store", store, "--annotations",
                       annotations, "--out", out, "--quiet", *extra)

    def infer(run, out):
        return cli_run("infer", "--run", run, "--store", store, "--annotations", annotations,
                       "--subset", "training", "--out", out, "--quiet")

    def evaluate(preds, out):
        return cli_run("evaluate", "--annotations", annotations, "--preds", preds, "--subset", "training",
                       "--json", out)

    def report(scenario, **facts):
        print(json.dumps({"scenario": scenario, **facts}), flush=True)

    # Outputs that exist before the disk fills up, on the tmpfs.
    assert train(work / "run")["exit"] == 0
    assert infer(work / "run", mnt / "preds.json")["exit"] == 0
    assert evaluate(mnt / "preds.json", mnt / "report.json")["exit"] == 0
    before = snapshot(mnt)

    filler = fill(mnt)
    report("train into a full disk", out=str(mnt / "new_run"),
           refused=train(mnt / "new_run"))
    report("infer over predictions on a full disk", out=str(mnt / "preds.json"),
           refused=infer(work / "run", mnt / "preds.json"))
    report("evaluate over a report on a full disk", out=str(mnt / "report.json"),
           refused=evaluate(mnt / "preds.json", mnt / "report.json"))
    report("store import into a full disk", out=str(mnt / "store.zarr"),
           refused=cli_run("store", "import", features, "--out", mnt / "store.zarr", "--fps", 30))
    kept = snapshot(mnt)
    filler.unlink()
    import_again = cli_run("store", "import", features, "--out", mnt / "store.zarr", "--fps", 30)
    report("full disk leaves earlier outputs intact", before=len(before),
           intact=all(kept.get(name) == data for name, data in before.items()),
           partial=[name for name in snapshot(mnt) if "partial" in name or ".tmp-" in name])
    report("once space is back the same commands succeed", train=train(mnt / "new_run"),
           infer=infer(work / "run", mnt / "preds.json"), import_again=import_again,
           verify=cli_run("store", "verify", mnt / "store.zarr"))
    shutil.rmtree(mnt / "new_run")
    shutil.rmtree(mnt / "store.zarr")

    # The disk fills up just as the second epoch's checkpoint is written, leaving less room
    # than it needs; then space is back.
    original_save = ckpt.save

    def fill_then_save(path, state):
        if state["epoch"] == 2 and not (mnt / "filler").exists():
            fill(mnt, leave=64 << 10)
        original_save(path, state)

    ckpt.save = fill_then_save
    stopped = train(mnt / "stopped_run")
    ckpt.save = original_save
    epoch_kept = torch.load(mnt / "stopped_run" / "last.pt", weights_only=True)["epoch"]
    (mnt / "filler").unlink()
    resumed = train(mnt / "stopped_run", "--resume")
    straight, again = final_weights(work / "run"), final_weights(mnt / "stopped_run")
    report("a run stopped by a full disk resumes to the uninterrupted weights",
           out=str(mnt / "stopped_run"), refused=stopped, epoch_kept=epoch_kept, resumed=resumed,
           same_weights=all(torch.equal(straight[part][k], again[part][k])
                            for part in ("model", "ema") for k in straight[part]))
    shutil.rmtree(mnt / "stopped_run")

    # Read-only: the tmpfs now holds a store and a run, then is remounted read-only.
    assert cli_run("store", "import", features, "--out", mnt / "store.zarr", "--fps", 30)[
        "exit"] == 0
    shutil.copytree(store, mnt / "shared.zarr")
    before = snapshot(mnt)
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    report("train into a read-only location", out=str(mnt / "ro_run"),
           refused=train(mnt / "ro_run"))
    report("infer into a read-only location", out=str(mnt / "preds.json"),
           refused=infer(work / "run", mnt / "preds.json"))
    report("evaluate into a read-only location", out=str(mnt / "report.json"),
           refused=evaluate(mnt / "preds.json", mnt / "report.json"))
    report("store import into a read-only store", out=str(mnt / "store.zarr"),
           refused=cli_run("store", "import", work / "features_more", "--out",
                           mnt / "store.zarr", "--fps", 30))
    shared_run = cli_run("train", "--config", config, "--store", mnt / "shared.zarr",
                         "--annotations", annotations, "--out", work / "from_shared", "--quiet")
    report("a read-only shared store trains and verifies", train=shared_run,
           verify=cli_run("store", "verify", mnt / "shared.zarr"),
           unchanged=snapshot(mnt) == before)


# Free space left before each append (bytes): none, a little, enough to stage the video but not
# to publish it (the video is about 256 KiB), and enough for most of the publication.
HDF5_LEAVE = [0, 4096, 65536, 200_000, 300_000, 420_000, 520_000]


def hdf5_full_disk_child(work: str):
    """In the private mount namespace: an HDF5 store on a small tmpfs; for each amount of free
    space, ``store import`` a video into it as a real process; prints one JSON line each."""
    import numpy as np

    work = Path(work)
    mnt = work / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    first, second = work / "first", work / "second"
    for folder, seed in ((first, 0), (second, 1)):
        folder.mkdir()
        values = np.random.default_rng(seed).normal(size=(1024, 64)).astype(np.float32)
        np.save(folder / f"video_{seed}.npy", values)
    store = mnt / "s.h5"

    def store_import(source):
        result = subprocess.run([sys.executable, str(REPO / "cli.py"), "store",
                                 "import", str(source), "--out", str(store), "--fps", "30",
                                 "--dtype", "float32"], capture_output=True, text=True)
        return {"exit": result.returncode, "stderr": result.stderr[-3000:]}

    assert store_import(first)["exit"] == 0
    for leave in HDF5_LEAVE:
        before = snapshot(mnt)
        filler = fill(mnt, leave)
        outcome = store_import(second)
        filler.unlink()
        after = snapshot(mnt)
        print(json.dumps({"leave": leave, "refused": outcome, "store": str(store),
                          "unchanged": {k: v for k, v in after.items() if "writers" not in k}
                          == {k: v for k, v in before.items() if "writers" not in k},
                          "verify": store_verify(store)}), flush=True)
        if outcome["exit"] == 0:
            break  # published: enough space was left
    print(json.dumps({"leave": "all", "refused": store_import(second), "store": str(store),
                      "verify": store_verify(store)}), flush=True)
    # store export into a disk with two pages free: the numbers of a short write were all it
    # said ("65536 requested and 2016 written").
    filler = fill(mnt, 8192)
    export = subprocess.run([sys.executable, str(REPO / "cli.py"), "store",
                             "export", str(store), "--out", str(mnt / "export")],
                            capture_output=True, text=True)
    filler.unlink()
    print(json.dumps({"export": {"exit": export.returncode, "stderr": export.stderr[-3000:]},
                      "out": str(mnt / "export"), "left": sorted(os.listdir(mnt / "export"))}),
          flush=True)
    # extract into an HDF5 store on the full disk ("double free or corruption" before).
    from store import locks
    from helpers.extraction import TINY, cli_args, write_videos

    write_videos(work / "videos", {"a.mp4": (60, 30), "b.mkv": (60, 30)})
    (work / "tiny.json").write_text(json.dumps(TINY))
    outcomes = []
    for leave in (16384, 65536):  # full while staging the first video; while publishing one
        locks.remove_path(str(mnt / "e.h5"))
        locks.remove_path(str(mnt / "e.h5.writers"))
        filler = fill(mnt, leave)
        extract = subprocess.run([sys.executable, str(REPO / "cli.py"),
                                  *cli_args(work / "videos", mnt / "e.h5", work / "tiny.json")],
                                 capture_output=True, text=True)
        filler.unlink()
        outcomes.append({"exit": extract.returncode, "stderr": extract.stderr[-3000:]})
    print(json.dumps({"extract": outcomes, "out": str(mnt / "e.h5")}), flush=True)


def store_verify(store) -> int:
    return subprocess.run([sys.executable, str(REPO / "cli.py"), "store", "verify",
                           str(store)], capture_output=True).returncode
