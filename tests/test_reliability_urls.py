"""Stores shared over URLs: training and inference read a store served by a real HTTP server on
127.0.0.1, through ``file://`` and from an S3-compatible server on 127.0.0.1 (moto), and give
the same predictions as from the local path. A URL store that cannot be used is one line saying
why: cannot connect, not authorised, not found, read-only, a server that stops answering, fails
(5xx) or cuts its answer short; a failure the next try does not see is retried. Video names
that hold ``%`` on disk are read over HTTP, and no command leaves a network session open.
"""
import json
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from helpers import REPO
from helpers.s3 import moto_server
from helpers.servers import serve_directory, silent_socket
from helpers.stores import HOSTILE_IDS, make_meta, write_video
from helpers.training import (synthetic_videos, tiny_config, write_annotations, write_config,
                              write_store)
from store import FeatureStore


@pytest.fixture
def served(tmp_path):
    """A directory served over HTTP on 127.0.0.1; yields (directory, base URL)."""
    (tmp_path / "www").mkdir()
    with serve_directory(tmp_path / "www") as server:
        yield tmp_path / "www", server.url


@pytest.fixture
def server(tmp_path):
    """A small store (videos 'a' and 'b c') in a served directory; yields the server, whose
    ``store`` is the store's URL."""
    fs = FeatureStore.create(tmp_path / "www" / "s.zarr", make_meta())
    for seed, video_id in enumerate(("a", "b c")):
        write_video(fs, video_id, seed, 5)
    fs.close()
    with serve_directory(tmp_path / "www") as running:
        running.store = f"{running.url}/s.zarr"
        yield running


# A short wait and one retry keep each failing case to a few seconds.
QUICK = ["--storage-options", json.dumps({"client_kwargs": {"timeout": 0.5}, "retries": 1})]


def train_and_infer(store, tmp_path, name, config, annotations, *extra) -> dict:
    runner = CliRunner()
    run = tmp_path / f"run_{name}"
    trained = runner.invoke(cli.main, ["train", "--config", config, "--store", store,
                                       "--annotations", annotations, "--out", run, "--quiet",
                                       *extra])
    assert trained.exit_code == 0, trained.output
    preds = tmp_path / f"preds_{name}.json"
    inferred = runner.invoke(cli.main, ["infer", "--run", run, "--store", store,
                                        "--annotations", annotations, "--subset", "validation",
                                        "--out", preds, "--quiet", *extra])
    assert inferred.exit_code == 0, inferred.output
    return json.loads(preds.read_text())


@pytest.mark.slow
def test_train_and_infer_from_http_and_file_urls_equal_the_local_path(served, tmp_path):
    www, base = served
    videos = {**synthetic_videos(4, "training"), **synthetic_videos(2, "validation", first=4)}
    store = write_store(www / "store.zarr", videos)
    annotations = write_annotations(tmp_path / "gt.json", videos)
    config = write_config(tmp_path / "config.json", tiny_config(train={"epochs": 1}))
    local = train_and_infer(str(store), tmp_path, "local", config, annotations)
    assert local["results"]
    for name, url in (("http", f"{base}/store.zarr"), ("file", f"file://{store}")):
        assert train_and_infer(url, tmp_path, name, config, annotations) == local, name


def test_a_url_without_a_store_is_one_line(served):
    _, base = served
    result = CliRunner().invoke(cli.main, ["store", "info", f"{base}/nothing.zarr"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {base}/nothing.zarr"), result.output


def test_importing_into_an_http_url_says_it_is_read_only(served, tmp_path):
    import numpy as np

    _, base = served
    (tmp_path / "features").mkdir()
    np.save(tmp_path / "features" / "a.npy", np.ones((8, 4), dtype=np.float32))
    result = CliRunner().invoke(cli.main, ["store", "import", str(tmp_path / "features"), "--out",
                                           f"{base}/new.zarr", "--fps", "30"])
    assert result.exit_code == 2, result.output
    assert_one_line(result, f"{base}/new.zarr", "read-only")


@pytest.mark.parametrize("options, problem", [
    ("[1", "--storage-options: not valid JSON"),
    ("[1, 2]", "--storage-options: expected a JSON object"),
    ("[" * 100_000, "--storage-options: not valid JSON"),
    ('{"anon": true}', "--storage-options: applies to URL stores"),
])
def test_bad_storage_options_are_one_line(tmp_path, options, problem):
    result = CliRunner().invoke(cli.main, ["store", "info", str(tmp_path / "s.zarr"),
                                           "--storage-options", options])
    assert result.exit_code == 2 and result.output.startswith(f"error: {problem}"), result.output


def assert_one_line(result, location, words):
    lines = result.output.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {location}"), result.output
    assert words in errors[0] and "Traceback" not in result.output, result.output


# -- an S3-compatible server on 127.0.0.1 -----------------------------------------------------------
@pytest.fixture
def s3(monkeypatch):
    """A moto S3 server on 127.0.0.1 with a bucket ``lab``; no credentials in the environment.
    Yields the storage options that reach it."""
    pytest.importorskip("moto.server")
    with moto_server(monkeypatch) as options:
        yield options


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # free once closed: nothing listens there


@pytest.mark.slow
def test_train_and_infer_from_s3_with_storage_options_equal_the_local_path(s3, tmp_path):
    import fsspec

    videos = {**synthetic_videos(4, "training"), **synthetic_videos(2, "validation", first=4)}
    store = write_store(tmp_path / "store.zarr", videos)
    fsspec.filesystem("s3", **s3).put(str(store), "lab/store.zarr", recursive=True)
    annotations = write_annotations(tmp_path / "gt.json", videos)
    config = write_config(tmp_path / "config.json", tiny_config(train={"epochs": 1}))
    local = train_and_infer(str(store), tmp_path, "local", config, annotations)
    remote = train_and_infer("s3://lab/store.zarr", tmp_path, "s3", config, annotations,
                             "--storage-options", json.dumps(s3))
    assert remote == local and local["results"]
    saved = b"".join(path.read_bytes() for path in (tmp_path / "run_s3").rglob("*")
                     if path.is_file())
    assert b"s3cret" not in saved  # credentials are used, never written


@pytest.mark.slow
def test_s3_store_failures_say_which_kind(s3, tmp_path):
    import numpy as np

    (tmp_path / "features").mkdir()
    np.save(tmp_path / "features" / "a.npy", np.ones((8, 4), dtype=np.float32))
    runner = CliRunner()
    options = ["--storage-options", json.dumps(s3)]
    url = "s3://lab/shared.zarr"
    made = runner.invoke(cli.main, ["store", "import", str(tmp_path / "features"), "--out", url,
                                    "--fps", "30", *options])
    assert made.exit_code == 0, made.output
    assert runner.invoke(cli.main, ["store", "info", url, *options]).exit_code == 0
    dead = {"endpoint_url": f"http://127.0.0.1:{closed_port()}",
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}
    cases = [
        (["info", "s3://lab/absent.zarr"], {}, "no such feature store"),
        (["info", "s3://no-such-bucket/s.zarr"], {}, "no such feature store"),
        (["info", url], {"key": None, "secret": None}, "not authorised"),
        (["info", url], {"key": None, "secret": None, "profile": "nobody"}, "not authorised"),
        (["info", url], dead, "cannot connect"),
        (["import", tmp_path / "features", "--out", "s3://lab/new.zarr", "--fps", "30"], dead,
         "cannot connect"),
    ]
    for args, options, words in cases:
        options = {key: value for key, value in {**s3, **options}.items() if value is not None}
        result = runner.invoke(cli.main, ["store", *map(str, args), "--storage-options",
                                          json.dumps(options)])
        location = args[1] if args[0] == "info" else args[3]
        assert result.exit_code == 2, (args, options, result.output)
        assert_one_line(result, location, words)


# -- names, silence, failures, sessions ---------------------------------------------------------------
NAMES = ["a b", "vidéo 日本", "new\nline", "_x", "-y", "%41", "zarr.json", "x" * 300,
         "video_test_0000004"]


def test_video_names_with_percent_escapes_are_read_over_http(tmp_path):
    assert set(NAMES) & set(HOSTILE_IDS)  # the ids the store tests use, and more
    local = FeatureStore.create(tmp_path / "www" / "s.zarr", make_meta())
    written = {vid: write_video(local, vid, seed, 4) for seed, vid in enumerate(NAMES)}
    with serve_directory(tmp_path / "www") as running:
        url = f"{running.url}/s.zarr"
        with FeatureStore.open(url) as remote:
            assert remote.videos() == local.videos() == sorted(NAMES)
            for vid, features in written.items():
                assert vid in remote, vid
                read = remote.read(vid)
                for layer, values in local.read(vid).items():
                    np.testing.assert_array_equal(read[layer], values)
        verified = CliRunner().invoke(cli.main, ["store", "verify", url])
    assert verified.exit_code == 0, verified.output
    assert f"{len(NAMES)} video(s) checked, 0 bad" in verified.output


@pytest.mark.parametrize("target", ["a store's metadata", "a video's features"])
def test_a_server_that_stops_answering_is_one_line_within_seconds(server, target):
    server.fail("silent", "s.zarr/zarr.json" if target == "a store's metadata" else "/last/c/")
    for command in ("info", "verify"):
        server.hits = 0
        started = time.monotonic()
        result = CliRunner().invoke(cli.main, ["store", command, server.store, *QUICK])
        took = time.monotonic() - started
        if command == "info" and target == "a video's features":
            assert result.exit_code == 0, result.output  # info reads no features
            continue
        assert result.exit_code == 2, result.output
        assert_one_line(result, server.store, "the server stopped answering")
        assert "--storage-options" in result.output and took < 15, (took, result.output)
        assert server.hits == 2  # the first try and one retry, then the command stops


@pytest.mark.parametrize("path", ["/last/c/", "/times/c/"])
def test_training_on_a_server_that_stops_answering_ends_in_one_line(tmp_path, path):
    videos = {**synthetic_videos(2, "training"), **synthetic_videos(1, "validation", first=2)}
    write_store(tmp_path / "www" / "store.zarr", videos)
    annotations = write_annotations(tmp_path / "gt.json", videos)
    config = write_config(tmp_path / "config.json", tiny_config(train={"epochs": 1}))
    with serve_directory(tmp_path / "www") as running:
        running.fail("silent", path)
        started = time.monotonic()
        result = CliRunner().invoke(cli.main, [
            "train", "--config", str(config), "--store", f"{running.url}/store.zarr",
            "--annotations", str(annotations), "--out", str(tmp_path / "run"), "--quiet",
            *QUICK])
        took = time.monotonic() - started
    assert result.exit_code == 2 and took < 30, (took, result.output)
    assert_one_line(result, f"{running.url}/store.zarr", "the server stopped answering")


def test_a_socket_that_never_answers_is_one_line():
    with silent_socket() as base:
        result = CliRunner().invoke(cli.main, ["store", "info", f"{base}/s.zarr", *QUICK])
    assert result.exit_code == 2, result.output
    assert_one_line(result, f"{base}/s.zarr", "the server stopped answering")


def test_http_stores_wait_a_bounded_time_by_default():
    from store import http
    from store.urls import close_filesystem, open_filesystem

    fs, _ = open_filesystem("http://127.0.0.1:9/s.zarr", {})
    timeout = fs.client_kwargs["timeout"]
    assert timeout.sock_read == timeout.sock_connect == http.HTTP_TIMEOUT_S <= 60
    assert fs.retries == http.HTTP_RETRIES and timeout.total is None  # a long answer may flow
    close_filesystem(fs)


SERVER_FAILURES = {500: "the server failed", 502: "the server failed",
                   503: "the server failed", "cut": "the server's answer was cut short"}


@pytest.mark.parametrize("failure", SERVER_FAILURES)
@pytest.mark.parametrize("target", ["s.zarr/zarr.json", "/c/"])
def test_a_failing_server_is_one_line(server, failure, target):
    server.fail(failure, target)
    command = "info" if target == "s.zarr/zarr.json" else "verify"
    result = CliRunner().invoke(cli.main, ["store", command, server.store, *QUICK])
    assert result.exit_code == 2, result.output
    assert_one_line(result, server.store, SERVER_FAILURES[failure])
    assert "bad:" not in result.output  # the server failed, not the videos


@pytest.mark.parametrize("command", ["info", "verify", "train"])
def test_a_commit_record_the_server_fails_to_deliver_is_not_a_missing_video(server, tmp_path,
                                                                             command):
    server.fail(503, "commits/a")
    args = ["store", command, server.store] if command != "train" else \
        ["train", "--store", server.store, "--config", write_config(tmp_path / "c.json",
                                                                   tiny_config()),
         "--annotations", write_annotations(tmp_path / "gt.json", {
             vid: {"subset": "training", "times": np.arange(5) / 7.5 + 0.27,
                   "annotations": [{"segment": [0.3, 0.6], "label": "x"}]}
             for vid in ("a", "b c")}), "--out", tmp_path / "run", "--quiet"]
    result = CliRunner().invoke(cli.main, [*map(str, args), *QUICK])
    assert result.exit_code == 2, result.output  # never a store listed without video 'a'
    assert_one_line(result, server.store, "the server failed")
    assert "skipping" not in result.output and "bad:" not in result.output, result.output


@pytest.mark.parametrize("failure", [503, "cut", "silent"])
def test_a_failure_the_next_try_does_not_see_is_retried(server, failure):
    server.fail(failure, "/last/c/", times=1)
    result = CliRunner().invoke(cli.main, ["store", "verify", server.store, *QUICK])
    assert result.exit_code == 0 and "2 video(s) checked, 0 bad" in result.output, result.output
    assert server.hits == 1


@pytest.mark.parametrize("options, problem", [
    ({"client_kwargs": {"timeout": "soon"}}, "client_kwargs timeout: expected seconds"),
    ({"client_kwargs": {"timeout": -1}}, "client_kwargs timeout: expected seconds"),
    ({"client_kwargs": {"timeout": {"sock_reed": 5}}}, "client_kwargs timeout:"),
    ({"retries": 1000}, "retries: expected a whole number from 0 to 10"),
])
def test_bad_http_options_are_one_line(server, options, problem):
    result = CliRunner().invoke(cli.main, ["store", "info", server.store, "--storage-options",
                                           json.dumps(options)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: --storage-options: {problem}"), result.output


def run_cli(*args) -> subprocess.CompletedProcess:
    """The command line in a process of its own: what it prints as it exits is seen too."""
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


@pytest.mark.slow
def test_commands_on_s3_and_http_leave_no_session_open(s3, tmp_path, served):
    import fsspec

    www, base = served
    videos = {**synthetic_videos(2, "training"), **synthetic_videos(1, "validation", first=2)}
    store = write_store(www / "store.zarr", videos)
    fsspec.filesystem("s3", **s3).put(str(store), "lab/store.zarr", recursive=True)
    annotations = write_annotations(tmp_path / "gt.json", videos)
    config = write_config(tmp_path / "config.json", tiny_config(train={"epochs": 1}))
    (tmp_path / "features").mkdir()
    np.save(tmp_path / "features" / "a.npy", np.ones((8, 4), dtype=np.float32))
    for url, options in (("s3://lab/store.zarr", s3), (f"{base}/store.zarr", None)):
        flag = ["--storage-options", json.dumps(options)] if options else []
        commands = [["store", "info", url], ["store", "verify", url],
                    ["store", "export", url, "--out", tmp_path / f"export{len(flag)}"],
                    ["train", "--config", config, "--store", url, "--annotations", annotations,
                     "--out", tmp_path / f"run{len(flag)}", "--quiet"]]
        if options:  # writing, and writing after a failure to connect (S3 only)
            dead = {**s3, "endpoint_url": f"http://127.0.0.1:{closed_port()}",
                    "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}
            commands += [["store", "import", tmp_path / "features", "--out", "s3://lab/n.zarr",
                          "--fps", "30"],
                         ["store", "info", url, "--storage-options", json.dumps(dead)]]
        for command in commands:
            result = run_cli(*command, *([] if "--storage-options" in command else flag))
            assert result.returncode == (2 if command[-2] == "--storage-options" else 0), \
                (command, result.stdout[-500:], result.stderr[-2000:])
            assert "Unclosed" not in result.stderr and "Traceback" not in result.stderr, \
                (command, result.stderr[-2000:])
