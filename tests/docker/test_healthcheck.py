"""docker/healthcheck.py, run as the container runs it, against a local HTTP server."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "docker" / "healthcheck.py"


class _Handler(http.server.BaseHTTPRequestHandler):
    statuses = {"/ready": 200, "/not-ready": 503, "/health": 200}

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        status = self.statuses.get(self.path, 404)
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def run_check(path: str, port: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WDSERVE_PORT": str(port), "WDSERVE_HEALTHCHECK_TIMEOUT": "2"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), path], env=env, capture_output=True, text=True, timeout=30
    )


def test_healthy_when_route_answers_200(port: int) -> None:
    result = run_check("/ready", port)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("path", ["/not-ready", "/missing"])
def test_unhealthy_on_error_status(port: int, path: str) -> None:
    result = run_check(path, port)
    assert result.returncode == 1
    assert "HTTP" in result.stderr


def test_unhealthy_when_nothing_listens() -> None:
    # A port that was free a moment ago: the connection is refused.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    result = run_check("/ready", free_port)
    assert result.returncode == 1
    assert str(free_port) in result.stderr
