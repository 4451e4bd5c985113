"""Stores shared over URLs: training and inference read a store served by a real HTTP server on
127.0.0.1 (and through ``file://``), and give the same predictions as from the local path.
"""
import functools
import http.server
import json
import threading

import pytest
from click.testing import CliRunner

import cli
from test_training import (synthetic_videos, tiny_config, write_annotations, write_config,
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


def train_and_infer(store, tmp_path, name, config, annotations) -> dict:
    runner = CliRunner()
    run = tmp_path / f"run_{name}"
    trained = runner.invoke(cli.main, ["train", "--config", config, "--store", store,
                                       "--annotations", annotations, "--out", run, "--quiet"])
    assert trained.exit_code == 0, trained.output
    preds = tmp_path / f"preds_{name}.json"
    inferred = runner.invoke(cli.main, ["infer", "--run", run, "--store", store,
                                        "--annotations", annotations, "--subset", "validation",
                                        "--out", preds, "--quiet"])
    assert inferred.exit_code == 0, inferred.output
    return json.loads(preds.read_text())


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
