"""Helpers for the server tests (importable because conftest.py puts this folder on sys.path)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from wdserve.server.app import create_app
from wdserve.server.models import ModelRegistry
from wdserve.server.settings import ServeSettings

# A short sentence in the tiny fixture's source language; the fixture models answer it with garbage "yy".
SENTENCE = "this book finds a tree"
# Test data, not measurements: the BLEU that de_en_workdir's model.json files claim, for the page to show
DE_EN_BLEU = {"teacher": 40.0, "student": 38.5}


def settings_for(workdir: Path, **overrides: Any) -> ServeSettings:
    """Settings isolated from the developer's WDSERVE_* environment, with small test limits."""
    values: dict[str, Any] = {"workdir": workdir, "default_max_length": 24, "max_length_limit": 64,
                              "max_beam_size": 4, "max_chars": 500, "max_texts": 8}
    values.update(overrides)
    return ServeSettings(**values)


def run(coroutine: Coroutine) -> Any:
    return asyncio.run(coroutine)


@contextlib.asynccontextmanager
async def serving(settings: ServeSettings, registry: ModelRegistry | None = None
                  ) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan (model loading, batchers) running, and a client talking to it in-process."""
    app = create_app(settings, registry)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://wdserve", timeout=30) as client:
            yield client


def metric(text: str, sample: str, **labels: str) -> float:
    """One sample's value (``wdserve_batch_size_count``, model=...) in Prometheus text; 0 if absent."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == sample and found.labels == labels:
                return found.value
    return 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


START_TIMEOUT_S = 60


class ServerProcess:
    """``wdserve serve`` in a child process on a free loopback port, ready when the constructor returns.

    Later flags win over the defaults here (``--log-level info`` overrides ``warning``); the
    server's output goes to a file that ``log()`` reads at any time.
    """

    def __init__(self, workdir: Path, *flags: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "wdserve.cli", "serve", "--workdir", str(workdir),
                   "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning", *flags]
        self._output = tempfile.TemporaryFile(mode="w+", encoding="utf-8")  # noqa: SIM115 (lives with the server)
        self.process = subprocess.Popen(command, env={**os.environ, **(env or {})}, stdout=self._output,
                                        stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}: {self.log()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"server not ready within {START_TIMEOUT_S} s")
            time.sleep(0.2)

    def log(self) -> str:
        self._output.seek(0)
        return self._output.read()

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode
