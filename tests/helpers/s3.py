"""An S3-compatible server (moto) on 127.0.0.1 for the tests of URL stores."""
import contextlib
import os
import urllib.request

BUCKET = "lab"


@contextlib.contextmanager
def moto_server(monkeypatch):
    """Start a moto S3 server on 127.0.0.1 with an empty bucket ``lab``; yields the storage
    options that reach it. The test's environment loses its AWS_* variables (through
    ``monkeypatch``, so they come back after it), so nothing reaches real AWS."""
    from moto.server import ThreadedMotoServer

    import fsspec

    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {"endpoint_url": f"http://{host}:{port}", "key": "lab-user",
                   "secret": "s3cret", "skip_instance_cache": True}
        # moto keeps its buckets in the process: start from none.
        urllib.request.urlopen(urllib.request.Request(
            f"{options['endpoint_url']}/moto-api/reset", method="POST")).close()
        fsspec.filesystem("s3", **options).mkdir(BUCKET)
        yield options
    finally:
        server.stop()
