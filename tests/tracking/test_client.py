"""The tracking server probe, against a real HTTP server on loopback."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator

import pytest

from tuner.errors import ConfigError
from tuner.tracking.client import check_reachable


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[str]:
    handler = type("Handler", (_Health,), {"status": getattr(request, "param", 200)})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_a_server_that_answers_is_fine(server: str) -> None:
    check_reachable(server)
    check_reachable(server + "/")


@pytest.mark.parametrize("server", [503], indirect=True)
def test_an_unhealthy_server_is_named_with_its_status(server: str) -> None:
    with pytest.raises(ConfigError, match=f"{server} answered /health with HTTP 503"):
        check_reachable(server)


def test_nobody_listening_is_a_config_error_at_once() -> None:
    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConfigError, match=f"cannot reach the MLflow tracking server.*:{port}"):
        check_reachable(f"http://127.0.0.1:{port}", timeout=5)


def test_local_stores_are_not_probed() -> None:
    check_reachable("sqlite:////nonexistent/mlflow.db")
