"""HTTP servers on 127.0.0.1 for stores over URLs: one that serves a directory and can be told to
misbehave for some paths (answer an error status, cut its answer short, or never answer), and a
socket that accepts connections and never answers at all."""
import contextlib
import functools
import http.server
import socket
import threading
import urllib.parse


class StoreHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the directory; a request whose decoded path contains ``server.failing_path`` gets
    ``server.failure``: an HTTP status (int), "cut" (half the body, then the connection closes)
    or "silent" (no answer until the server stops); only the first ``server.failures_left`` such
    requests if that is not None."""

    def log_message(self, *args):  # no request log on the test's stderr
        pass

    def do_GET(self):
        if not self._misbehave(head=False):
            super().do_GET()

    def do_HEAD(self):
        if not self._misbehave(head=True):
            super().do_HEAD()

    def _misbehave(self, head: bool) -> bool:
        server = self.server
        if server.failure is None or server.failures_left == 0 or \
                server.failing_path not in urllib.parse.unquote(self.path):
            return False
        server.hits += 1
        if server.failures_left is not None:
            server.failures_left -= 1
        if server.failure == "silent":
            server.stopped.wait()
        elif server.failure == "cut":
            if head:
                return False
            with open(self.translate_path(self.path), "rb") as file:
                body = file.read()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        else:
            self.send_error(server.failure)
        return True


@contextlib.contextmanager
def serve_directory(directory):
    """Serve ``directory`` on 127.0.0.1; yields the server (``.url``; ``.fail(...)`` makes it
    misbehave, ``.hits`` counts the requests it failed)."""
    handler = functools.partial(StoreHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.fail = functools.partial(_fail, server)
    server.fail(None)
    server.stopped = threading.Event()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stopped.set()
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def silent_socket():
    """A listening socket on 127.0.0.1 that never accepts: connections succeed (the kernel
    queues them) and requests are never answered. Yields its base URL."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def _fail(server, failure, path="", times=None):
    """From now on, answer requests for ``path`` with ``failure`` (None: serve them)."""
    server.failure, server.failing_path, server.failures_left, server.hits = failure, path, times, 0
