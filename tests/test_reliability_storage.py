"""Reliability campaign, a full disk and read-only storage for stage two (see docs/reliability.md).

The store's own write path is covered with injected failures in tests/test_store_faults.py.
Here the real kernel says no: a child process (``unshare -rm``, a private mount namespace, no
privileges needed) mounts a small tmpfs, fills it to the last byte or remounts it read-only, and
runs ``train``, ``infer``, ``evaluate`` and ``store import`` into it through the command line.
Every refusal must be one ``error:`` line naming the output, leave what was there intact and no
partial file behind, and the same command must succeed once space is back. A run that fills
the disk after its first epoch resumes to the weights of a run that never stopped.

The child (helpers/full_disk.py) reports what it saw as JSON lines; the tests below judge them,
one scenario each.
"""
import json
import os
import subprocess
import sys

import pytest

from helpers import TESTS_DIR


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    work = tmp_path_factory.mktemp("storage")
    extra = work / "features_more"
    extra.mkdir()
    import numpy as np

    np.save(extra / "w0.npy", np.zeros((8, 4), dtype=np.float32))
    script = f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r}); " \
             f"from helpers.full_disk import child; child({str(work)!r})"
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
             f"from helpers.full_disk import hdf5_full_disk_child; " \
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
    from helpers import REPO
    from helpers.extraction import TINY, cli_args, write_videos
    from helpers.concurrency import read_only_view

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
