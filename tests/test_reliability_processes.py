"""No process outlives its command: `cli.py extract` killed while its decoding workers start.

The command runs in its own session, so every process it starts (decoding workers, the
multiprocessing resource tracker) keeps the session id even once reparented to init; the test
kills the main process and then waits for the session to empty. Its stdout must reach EOF too
(workers holding it made ``extract ... | tee log`` hang).
"""
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO
from helpers.extraction import TINY, cli_args
from helpers.processes import session_processes
from helpers.videos import write_video

GONE_WITHIN_S = 10  # after the main process dies, every process of its session must be gone


def is_worker(command: str) -> bool:
    return "--multiprocessing-fork" in command


@pytest.fixture(scope="module")
def extraction_inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("orphans")
    videos = folder / "videos"
    videos.mkdir()
    for seed in range(4):
        write_video(videos / f"v{seed}.mp4", 40, seed=seed)
    backbone = folder / "tiny.json"
    backbone.write_text(json.dumps(TINY))
    return videos, backbone


def as_from_a_terminal():
    """A command started from a terminal gets Ctrl-C; one started in the background (``nohup``,
    ``cmd &`` in a script, some CI runners) inherits SIGINT ignored, and Python then never raises
    KeyboardInterrupt. Restore the default so the test means the same wherever it runs."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def kill_while_workers_start(videos, store, backbone, sig, delay, workers, group=False):
    """Start extract, send ``sig`` ``delay`` s after its first decoding worker appears (to the
    whole process group, as a terminal's Ctrl-C does, with ``group``); return the processes of
    its session still alive ``GONE_WITHIN_S`` later (killed then), the main process's exit
    status and its stderr."""
    process = subprocess.Popen(
        [sys.executable, "cli.py", *cli_args(videos, store, backbone, "--num-workers", workers)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        preexec_fn=as_from_a_terminal)
    try:
        deadline = time.monotonic() + 120
        while not any(map(is_worker, session_processes(process.pid).values())):
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.01)
        time.sleep(delay)
        (os.killpg if group else os.kill)(process.pid, sig)
        deadline = time.monotonic() + GONE_WITHIN_S
        while session_processes(process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = session_processes(process.pid)
        if not left:  # EOF on its pipes: nothing else holds them (``extract | tee`` ends)
            _, stderr = process.communicate(timeout=GONE_WITHIN_S)
            return left, process.returncode, stderr.decode()
        return left, process.returncode, ""
    finally:
        for pid in session_processes(process.pid):
            os.kill(pid, signal.SIGKILL)
        process.kill()
        process.wait()


# (signal, seconds after the first worker appears, workers): the moment it appears is the
# window the kernel's parent-death signal did not cover; later, the workers are importing.
KILLS = [(signal.SIGKILL, 0.0, 1), (signal.SIGKILL, 0.5, 4), (signal.SIGTERM, 0.0, 2)]


@pytest.mark.slow
@pytest.mark.parametrize("sig, delay, workers", KILLS)
def test_killed_while_workers_start_leaves_no_process(extraction_inputs, tmp_path, sig, delay,
                                                      workers):
    videos, backbone = extraction_inputs
    left, _, _ = kill_while_workers_start(videos, tmp_path / "s.zarr", backbone, sig, delay, workers)
    assert not left, left


@pytest.mark.slow
@pytest.mark.parametrize("sig, group, code", [(signal.SIGINT, True, 130),
                                              (signal.SIGTERM, False, 143)])
def test_stopped_while_workers_start_says_so_in_one_line(extraction_inputs, tmp_path, sig,
                                                          group, code):
    """Ctrl-C printed ~100 lines of worker tracebacks and exited 1 ("some videos failed");
    SIGTERM ended the command without a word."""
    videos, backbone = extraction_inputs
    left, returncode, stderr = kill_while_workers_start(videos, tmp_path / "s.zarr", backbone,
                                                        sig, 1.0, 2, group=group)
    assert not left, left
    # Besides the announcement of the device it started on, one line.
    lines = [line for line in stderr.splitlines()
             if line.strip() and not line.startswith("extracting on ")]
    assert returncode == code and lines == [f"stopped by {sig.name}"], (returncode, stderr)


@pytest.mark.parametrize("context, warns", [("extract.workers.SpawnContext()", False),
                                            ("multiprocessing.get_context('spawn')", True)])
def test_semaphores_left_to_the_resource_tracker_print_nothing(context, warns):
    """A command stopped while its workers start kills them, and its queues' semaphores can be
    left to multiprocessing's resource tracker, which printed two warnings after `stopped by
    SIGTERM` (seen once in about 20 runs of the test above). A process that exits without its
    clean-up leaves them the same way: the extraction's context keeps the tracker quiet; the
    plain one shows the lines it keeps away."""
    code = f"import os, multiprocessing, extract.workers; queue = {context}.Queue(); os._exit(0)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=60)  # the tracker holds stderr until it is done
    assert result.returncode == 0
    assert ("leaked semaphore" in result.stderr) == warns, result.stderr
    if not warns:
        assert result.stderr == ""


def test_a_decoding_worker_imports_neither_the_backbone_nor_the_store():
    """What a worker unpickles (its dataset) imports only decoding: the less a worker imports,
    the sooner it can work, and the smaller it is."""
    code = ("import pickle, sys; pickle.loads(sys.stdin.buffer.read()); "
            "print(' '.join(sorted(sys.modules)))")
    from extract.clips import ClipChunks
    from store.protocol import SamplingProtocol
    from extract.workers import QueueFeed

    dataset = pickle.dumps(ClipChunks(QueueFeed(None), SamplingProtocol(), 8))
    result = subprocess.run([sys.executable, "-c", code], input=dataset, cwd=REPO,
                            capture_output=True, check=True)
    modules = result.stdout.decode().split()
    assert "extract.clips" in modules
    # The sampling protocol is part of the store's metadata (store/protocol.py): a worker needs
    # it, and nothing else of the store.
    light = ("store", "store.meta", "store.protocol")
    heavy = [m for m in modules if m.split(".")[0] in ("timm", "zarr", "h5py", "store")
             and m not in light or m == "extract.backbone"]
    assert not heavy, heavy


SIDE_BY_SIDE = """
import sys, time
sys.path.insert(0, {repo!r})
from synth.demo import run_side_by_side
run_side_by_side({{"a": (time.sleep, (120,)), "b": (time.sleep, (120,))}})
"""


@pytest.mark.slow
def test_the_demos_trainings_die_with_a_killed_demo(tmp_path):
    """``make demo`` runs its two trainings in spawned processes: a SIGKILLed demo left them
    training to the end, orphaned."""
    process = subprocess.Popen([sys.executable, "-c", SIDE_BY_SIDE.format(repo=str(REPO))],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while sum(map(is_worker, session_processes(process.pid).values())) < 2:
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.05)
        time.sleep(1.0)  # both children running their job
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        deadline = time.monotonic() + GONE_WITHIN_S
        while session_processes(process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not session_processes(process.pid), session_processes(process.pid)
    finally:
        for pid in session_processes(process.pid):
            os.kill(pid, signal.SIGKILL)
        process.kill()
        process.wait()
