"""Reliability campaign, a full disk and read-only storage for stage two (see docs/reliability.md).

The store's own write path is covered with injected failures in tests/test_store_faults.py.
Here the real kernel says no: a child process (``unshare -rm``, a private mount namespace, no
privileges needed) mounts a small tmpfs, fills it to the last byte or remounts it read-only, and
runs ``train``, ``infer``, ``evaluate`` and ``store import`` into it through the command line.
Every refusal must be one ``error:`` line naming the output, leave what was there intact and no
partial file behind, and the same command must succeed once space is back. A run that fills
the disk after its first epoch resumes to the weights of a run that never stopped.

The child reports what it saw as JSON lines; the tests below judge them, one scenario each.
"""
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
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
    sys.path[:0] = [str(TESTS_DIR), str(TESTS_DIR.parent)]
    import numpy as np
    import torch
    from click.testing import CliRunner

    import cli
    import training.checkpoint as ckpt
    from test_training import (final_weights, synthetic_videos, tiny_config, write_annotations,
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
        return cli_run("evaluate", "--gt", annotations, "--preds", preds, "--subset", "training",
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


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    work = tmp_path_factory.mktemp("storage")
    extra = work / "features_more"
    extra.mkdir()
    import numpy as np

    np.save(extra / "w0.npy", np.zeros((8, 4), dtype=np.float32))
    script = f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r}); " \
             f"from test_reliability_storage import child; child({str(work)!r})"
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no private mount namespace here (unshare -rm): "
                    f"{probe.stderr.decode().strip()}")
    result = subprocess.run(["unshare", "-rm", sys.executable, "-c", script],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1",
                                 "PYTHONWARNINGS": "ignore"})
    found = {}
    for line in result.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            found[record.pop("scenario")] = record
    assert result.returncode == 0, result.stderr[-3000:]
    return found


def assert_refused(outcome, out, words):
    errors = [line for line in outcome["stderr"].splitlines() if line.startswith("error: ")]
    assert outcome["exit"] == 2 and len(errors) == 1, outcome
    assert errors[0].startswith(f"error: {out}") and words in errors[0], errors[0]
    assert "Traceback" not in outcome["stderr"]


REFUSALS = {
    "train into a full disk": "no space left on the device",
    "infer over predictions on a full disk": "No space left on device",
    "evaluate over a report on a full disk": "No space left on device",
    "store import into a full disk": "no space left on the device",
    "train into a read-only location": "read-only file system",
    "infer into a read-only location": "Read-only file system",
    "evaluate into a read-only location": "Read-only file system",
    "store import into a read-only store": "read-only file system",
}


@pytest.mark.slow
@pytest.mark.parametrize("scenario", list(REFUSALS))
def test_an_output_that_cannot_be_written_is_one_line(reports, scenario):
    facts = reports[scenario]
    assert_refused(facts["refused"], facts["out"], REFUSALS[scenario])


@pytest.mark.slow
def test_a_full_disk_damages_nothing_already_written(reports):
    facts = reports["full disk leaves earlier outputs intact"]
    assert facts["before"] >= 2 and facts["intact"] and facts["partial"] == []


@pytest.mark.slow
def test_once_space_is_back_the_same_commands_succeed(reports):
    facts = reports["once space is back the same commands succeed"]
    for name in ("train", "infer", "import_again", "verify"):
        assert facts[name]["exit"] == 0, (name, facts[name])


@pytest.mark.slow
def test_a_run_stopped_by_a_full_disk_resumes_to_the_same_weights(reports):
    facts = reports["a run stopped by a full disk resumes to the uninterrupted weights"]
    assert_refused(facts["refused"], facts["out"], "cannot write the checkpoint (the previous one "
                   "is intact): no space left on the device")
    assert facts["epoch_kept"] == 1 and facts["resumed"]["exit"] == 0, facts
    assert facts["same_weights"]


@pytest.mark.slow
def test_a_read_only_shared_store_is_used_and_left_unchanged(reports):
    facts = reports["a read-only shared store trains and verifies"]
    assert facts["train"]["exit"] == 0, facts["train"]
    assert facts["verify"]["exit"] == 0, facts["verify"]
    assert facts["unchanged"]


# -- HDF5 on a really full disk -------------------------------------------------------------------
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
        result = subprocess.run([sys.executable, str(TESTS_DIR.parent / "cli.py"), "store",
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
    export = subprocess.run([sys.executable, str(TESTS_DIR.parent / "cli.py"), "store",
                             "export", str(store), "--out", str(mnt / "export")],
                            capture_output=True, text=True)
    filler.unlink()
    print(json.dumps({"export": {"exit": export.returncode, "stderr": export.stderr[-3000:]},
                      "out": str(mnt / "export"), "left": sorted(os.listdir(mnt / "export"))}),
          flush=True)
    # extract into an HDF5 store on the full disk ("double free or corruption" before).
    from store import locks
    from test_extract_pipeline import TINY, cli_args, write_videos

    write_videos(work / "videos", {"a.mp4": (60, 30), "b.mkv": (60, 30)})
    (work / "tiny.json").write_text(json.dumps(TINY))
    outcomes = []
    for leave in (16384, 65536):  # full while staging the first video; while publishing one
        locks.remove_path(str(mnt / "e.h5"))
        locks.remove_path(str(mnt / "e.h5.writers"))
        filler = fill(mnt, leave)
        extract = subprocess.run([sys.executable, str(TESTS_DIR.parent / "cli.py"),
                                  *cli_args(work / "videos", mnt / "e.h5", work / "tiny.json")],
                                 capture_output=True, text=True)
        filler.unlink()
        outcomes.append({"exit": extract.returncode, "stderr": extract.stderr[-3000:]})
    print(json.dumps({"extract": outcomes, "out": str(mnt / "e.h5")}), flush=True)


def store_verify(store) -> int:
    return subprocess.run([sys.executable, str(TESTS_DIR.parent / "cli.py"), "store", "verify",
                           str(store)], capture_output=True).returncode


@pytest.mark.slow
def test_hdf5_on_a_really_full_disk_is_one_line_and_loses_nothing(tmp_path):
    """It crashed: ``SystemError`` during publication, pages of "Exception ignored" and a
    segfault when full while staging. Each append must be refused in one line naming the store,
    leave the file as it was, and succeed once space is back. Then ``store export`` into the
    full disk must say so (it said ``cannot write: 3136 requested and 2016 written``), and so
    must ``extract`` into an HDF5 store there (it aborted: ``double free or corruption``)."""
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no private mount namespace here (unshare -rm)")
    script = f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r}); " \
             f"from test_reliability_storage import hdf5_full_disk_child; " \
             f"hdf5_full_disk_child({str(tmp_path)!r})"
    result = subprocess.run(["unshare", "-rm", sys.executable, "-c", script],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    *attempts, last, export, extract = records
    for outcome in extract["extract"]:  # a segfault, then a SystemError traceback, before
        assert_refused(outcome, extract["out"], "no space left on the device")
    assert_refused(export["export"], export["out"], "no space left on the device")
    assert not any(name.endswith(".partial") for name in export["left"]), export
    assert len(attempts) >= 3, records  # several amounts of free space were refused
    for record in attempts:
        if record["refused"]["exit"] == 0:
            continue  # the last amount may have been enough
        assert "Exception ignored" not in record["refused"]["stderr"], record
        assert_refused(record["refused"], record["store"], "no space left on the device")
        assert record["unchanged"] and record["verify"] == 0, record
    assert last["refused"]["exit"] == 0 and last["verify"] == 0, last


@pytest.mark.slow
def test_rerunning_a_finished_extraction_without_write_access_does_nothing(tmp_path):
    """A lab member who may only read a shared store re-runs the extraction that filled it:
    nothing is left to do, so it must say so (it failed with ``cannot claim video ...``,
    claiming before looking whether the video was finished)."""
    from test_extract_pipeline import REPO, TINY, cli_args, write_videos
    from test_reliability_concurrency import read_only_view

    if subprocess.run([*read_only_view(tmp_path), "true"], capture_output=True).returncode:
        pytest.skip("no private mount namespace with a read-only bind mount here (unshare -rm)")
    write_videos(tmp_path / "videos", {"a.mp4": (24, 30), "b.mkv": (20, 30)})
    backbone = tmp_path / "tiny.json"
    backbone.write_text(json.dumps(TINY))
    (tmp_path / "shared").mkdir()
    command = [sys.executable, "cli.py", *cli_args(tmp_path / "videos",
                                                    tmp_path / "shared" / "s.zarr", backbone)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    owner = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    assert owner.returncode == 0, owner.stderr[-2000:]
    reader = subprocess.run([*read_only_view(tmp_path / "shared"), *command], cwd=REPO,
                            capture_output=True, text=True, env=env)
    assert reader.returncode == 0, reader.stderr[-2000:]
    assert "extracted 0 videos" in reader.stdout and "2 already in the store" in reader.stdout
