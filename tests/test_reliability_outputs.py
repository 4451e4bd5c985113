"""Reliability campaign, where outputs go (see docs/reliability.md): every file the project writes
goes through ``losa_tal.open_output``.

A link another user of a shared folder plants at a temporary name must not redirect a write; a
device, FIFO or descriptor given as the output is written, never replaced by a regular file; a
socket is refused in one line; two writers of one output end with one whole file and
a reader never sees half of one. Run through the commands (``infer``, ``evaluate``, ``store
export``, ``train``'s checkpoints) wherever one is involved.
"""
import json
import os
import socket
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from helpers import REPO, TESTS_DIR
from helpers.training import synthetic_videos, tiny_config, write_annotations, write_config, \
    write_store

CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
PRECIOUS = "a file the user did not name\n"


def run_cli(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A store, its annotations, a config and a run trained on them for one epoch."""
    root = tmp_path_factory.mktemp("outputs")
    videos = {**synthetic_videos(2, "training", num_steps=48),
              **synthetic_videos(1, "validation", first=2, num_steps=48)}
    files = {"store": write_store(root / "store.zarr", videos),
             "annotations": write_annotations(root / "gt.json", videos),
             "config": write_config(root / "config.json", tiny_config(
                 train={"epochs": 1}, head={"max_seq_len": 48}))}
    trained = train(files, root / "run")
    assert trained.exit_code == 0, trained.output
    return {**files, "run": root / "run"}


def train(files, out):
    return run_cli("train", "--config", files["config"], "--store", files["store"],
                   "--annotations", files["annotations"], "--out", out, "--quiet")


def infer_args(run, out):
    return ["infer", "--run", run["run"], "--store", run["store"], "--annotations",
            run["annotations"], "--subset", "training", "--out", out, "--quiet"]


def evaluate_args(run, predictions, out):
    return ["evaluate", "--annotations", run["annotations"], "--preds", predictions, "--subset",
            "training", "--json", out]


@pytest.fixture(scope="module")
def predictions(run, tmp_path_factory):
    path = tmp_path_factory.mktemp("predictions") / "preds.json"
    result = run_cli(*infer_args(run, path))
    assert result.exit_code == 0, result.output
    return path


def plant_link(name, tmp_path):
    """A link at ``name`` to a file the user never named; returns that file."""
    victim = tmp_path / "victim.txt"
    victim.write_text(PRECIOUS)
    os.symlink(victim, name)
    return victim


def assert_one_line(result, path, problem):
    assert result.exit_code == 2, result.output
    message = result.stderr.rstrip("\n")
    assert "\n" not in message and "Traceback" not in message, message
    assert message.startswith(f"error: {path}: ") and problem in message, message


def kind(path) -> int:
    return stat.S_IFMT(os.lstat(path).st_mode)


@pytest.mark.parametrize("command", ["infer", "store export", "train checkpoint"])
def test_a_link_planted_at_the_old_temporary_name_redirects_nothing(run, tmp_path, command):
    """``<out>.partial`` was a fixed name: a link planted there made the write land on the
    link's target (any file the user may write)."""
    if command == "infer":
        out = tmp_path / "preds.json"
        victim = plant_link(f"{out}.partial", tmp_path)
        result = run_cli(*infer_args(run, out))
        written = json.loads(out.read_text())["results"]
    elif command == "store export":
        out = tmp_path / "export"
        out.mkdir()
        victim = plant_link(out / "video_000.npy.partial", tmp_path)
        result = run_cli("store", "export", run["store"], "--out", out)
        written = np.load(out / "video_000.npy")
    else:
        out = tmp_path / "run"
        out.mkdir()
        victim = plant_link(out / "last.pt.partial", tmp_path)
        result = train(run, out)
        written = (out / "last.pt").read_bytes()
    assert result.exit_code == 0, result.output
    assert len(written) and victim.read_text() == PRECIOUS


def test_a_link_at_the_output_is_replaced_its_target_untouched(run, predictions, tmp_path):
    out = tmp_path / "report.json"
    victim = plant_link(out, tmp_path)
    result = run_cli(*evaluate_args(run, predictions, out))
    assert result.exit_code == 0, result.output
    assert kind(out) == stat.S_IFREG and "average_mAP" in json.loads(out.read_text())
    assert victim.read_text() == PRECIOUS


def make_device(path, minor):
    """A character device node like /dev/null (minor 3) or /dev/full (7), under tmp_path."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, minor))
    except PermissionError:
        pytest.skip("making a device node needs root (CAP_MKNOD)")
    return path


def test_a_device_given_as_the_output_is_written_never_replaced(run, predictions, tmp_path):
    """``infer --out /dev/full`` as root replaced the device with a JSON file."""
    full = make_device(tmp_path / "full", 7)
    assert_one_line(run_cli(*infer_args(run, full)), full, "No space left on device")
    assert_one_line(run_cli(*evaluate_args(run, predictions, full)), full,
                    "No space left on device")
    null = make_device(tmp_path / "null", 3)
    for args in (infer_args(run, null), evaluate_args(run, predictions, null)):
        result = run_cli(*args)
        assert result.exit_code == 0, result.output
    assert kind(full) == kind(null) == stat.S_IFCHR
    assert sorted(os.listdir(tmp_path)) == ["full", "null"]  # nothing left beside them


def test_a_fifo_given_as_the_output_is_written_through(run, predictions, tmp_path):
    """A FIFO given to ``evaluate --json`` was replaced by a regular file (and its reader
    waited forever)."""
    fifo = tmp_path / "report.fifo"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    result = run_cli(*evaluate_args(run, predictions, fifo))
    try:
        received, _ = reader.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        reader.kill()
        received, _ = reader.communicate()
    assert result.exit_code == 0, result.output
    assert kind(fifo) == stat.S_IFIFO
    regular = tmp_path / "report.json"
    assert run_cli(*evaluate_args(run, predictions, regular)).exit_code == 0
    assert json.loads(received) == json.loads(regular.read_text())


def test_a_descriptor_path_is_written_where_it_points(run, predictions):
    """``--out /dev/fd/N`` (as ``/dev/stdout`` is) writes into that descriptor: here a pipe."""
    readable, writable = os.pipe()
    try:
        result = run_cli(*evaluate_args(run, predictions, f"/dev/fd/{writable}"))
        assert result.exit_code == 0, result.output
        os.close(writable)
        with os.fdopen(readable, "rb") as pipe:
            assert "average_mAP" in json.loads(pipe.read())
    finally:
        for descriptor in (readable, writable):
            try:
                os.close(descriptor)
            except OSError:
                pass


def test_a_socket_at_the_output_is_refused_in_one_line(run, predictions, tmp_path):
    listening = socket.socket(socket.AF_UNIX)
    path = tmp_path / "sock"
    listening.bind(str(path))
    try:
        assert_one_line(run_cli(*infer_args(run, path)), path, "is a socket; refusing")
        assert_one_line(run_cli(*evaluate_args(run, predictions, path)), path,
                        "is a socket; refusing")
        assert kind(path) == stat.S_IFSOCK
    finally:
        listening.close()
    assert sorted(os.listdir(tmp_path)) == ["sock"]  # no temporary file left behind


# ---------------------------------------------------------------------------------------------
# Concurrency.

WRITER = """
import sys
sys.path[:0] = [{repo!r}]
from training.infer import write_predictions
tag = sys.argv[2]
# Serialising takes little time beside writing (a long string), so the two writes overlap often.
payload = {{"results": {{f"video_{{i}}": [{{"segment": [i, i + 1.5], "label": tag,
                                          "score": 0.5}}] for i in range(1000)}},
           "note": tag * 200_000}}
for _ in range(int(sys.argv[3])):
    write_predictions(sys.argv[1], payload)
"""


def test_two_writers_of_one_output_end_with_one_whole_file_never_seen_half_written(tmp_path):
    """Two writers shared one ``<out>.partial``: one failed with "No such file or directory"
    now and then, and a reader once saw half-written JSON. Here two processes each write their
    predictions (about 1 MB) 20 times over one path while this process reads it in a loop."""
    out = tmp_path / "preds.json"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER.format(repo=str(REPO)), str(out),
                                 tag, "20"], stderr=subprocess.PIPE, text=True, env=CHILD_ENV)
               for tag in ("first", "second")]
    seen = set()
    while any(writer.poll() is None for writer in writers):
        try:
            text = out.read_bytes()
        except FileNotFoundError:  # before the first write
            continue
        results = json.loads(text)["results"]  # never half a file
        assert len(results) == 1000
        seen.add(results["video_0"][0]["label"])
        time.sleep(0.01)
    errors = [writer.communicate()[1] for writer in writers]
    assert [writer.returncode for writer in writers] == [0, 0], errors
    final = json.loads(out.read_text())["results"]
    assert len(final) == 1000 and len({det[0]["label"] for det in final.values()}) == 1
    assert seen and os.listdir(tmp_path) == ["preds.json"]


@pytest.mark.slow
def test_two_infer_runs_with_one_out_both_succeed(run, predictions, tmp_path):
    out = tmp_path / "preds.json"
    command = [sys.executable, str(REPO / "cli.py"), *map(str, infer_args(run, out))]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=CHILD_ENV, cwd=TESTS_DIR) for _ in range(2)]
    outputs = [process.communicate(timeout=300) for process in runs]
    assert [process.returncode for process in runs] == [0, 0], outputs
    assert json.loads(out.read_text()) == json.loads(predictions.read_text())
    assert os.listdir(tmp_path) == ["preds.json"]
