"""Stores shared over URLs: training and inference read a store served by a real HTTP server on
127.0.0.1, through ``file://`` and from an S3-compatible server on 127.0.0.1 (moto), and give
the same predictions as from the local path. A URL store that cannot be used is one line saying
why: cannot connect, not authorised, not found, read-only.
"""
import functools
import http.server
import json
import os
import socket
import threading

import pytest
from click.testing import CliRunner

import cli
from helpers.training import (synthetic_videos, tiny_config, write_annotations, write_config,
                              write_store)


@pytest.fixture
def served(tmp_path):
    """A directory served over HTTP on 127.0.0.1; yields (directory, base URL)."""
    handler = functools.partial(QuietHandler, directory=str(tmp_path / "www"))
    (tmp_path / "www").mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield tmp_path / "www", f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no request log on the test's stderr
        pass


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
    moto_server = pytest.importorskip("moto.server")
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"endpoint_url": f"http://{host}:{port}", "key": "lab-user", "secret": "s3cret",
               "skip_instance_cache": True}
    import urllib.request

    import fsspec

    # moto keeps its buckets in the process: start each test from none.
    urllib.request.urlopen(urllib.request.Request(f"{options['endpoint_url']}/moto-api/reset",
                                                  method="POST")).close()
    fsspec.filesystem("s3", **options).mkdir("lab")
    yield options
    server.stop()


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
