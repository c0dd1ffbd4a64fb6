"""``wdserve serve`` as a real uvicorn process on a loopback port: routes, batching, overload, SIGTERM."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from measure_batching import burst_seconds, direct_seconds
from serve_helpers import SENTENCE, ServerProcess, metric


@pytest.fixture(scope="module")
def server(tiny_workdir: Path) -> Iterator[ServerProcess]:
    running = ServerProcess(tiny_workdir, "--max-wait-ms", "30", "--max-batch-size", "16",
                            "--default-max-length", "24", "--max-length-limit", "64")
    yield running
    running.stop()


def test_routes_over_http(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.get("/health").json() == {"status": "alive"}
        assert client.get("/ready").status_code == 200
        assert client.get("/languages").json()[0]["targets"] == ["yy"]
        assert {m["name"] for m in client.get("/models").json()} >= {"teacher-int8", "student-float32"}
        translated = client.post("/translate", json={"q": [SENTENCE], "source": "xx", "target": "yy"})
        assert translated.status_code == 200 and len(translated.json()["translatedText"]) == 1
        compared = client.post("/translate/compare", json={"q": SENTENCE})
        assert [r["model"] for r in compared.json()["results"]] == ["teacher-int8", "student-int8"]
        malformed = client.post("/translate", content=b'{"q": ', headers={"content-type": "application/json"})
        assert malformed.status_code == 400 and "malformed JSON" in malformed.json()["error"]
        bad_bytes = client.post("/translate", content=b'{"q": "\xff\xfe"}',
                                headers={"content-type": "application/json"})
        assert bad_bytes.status_code == 400 and "UTF-8" in bad_bytes.json()["error"]
        assert client.get("/openapi.json").json()["info"]["title"] == "wdserve"
        assert client.get("/health").status_code == 200


def test_concurrent_burst_is_served_in_batches(server: ServerProcess, tiny_workdir: Path) -> None:
    lines = (tiny_workdir / "data" / "test.src").read_text(encoding="utf-8").splitlines()
    sentences = [lines[i % len(lines)] for i in range(64)]
    options = {"beam_size": 1, "max_length": 32}

    def batch_metrics() -> tuple[float, float, float]:
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        return tuple(metric(text, f"wdserve_batch_size_{sample}", model="teacher-float32", **labels)
                     for sample, labels in (("count", {}), ("sum", {}), ("bucket", {"le": "1.0"})))

    before = batch_metrics()
    served_s = asyncio.run(burst_seconds(server.port, sentences, model="teacher-float32", **options))
    after = batch_metrics()
    calls, sentences_done, single = (after[i] - before[i] for i in range(3))
    assert sentences_done == 16 + 64  # warm-up burst + measured burst
    assert calls < 16 + 64 and single < calls, "no batch larger than one sentence"
    direct_s = direct_seconds(tiny_workdir / "export" / "teacher-float32", sentences, **options)
    print(f"\n64 concurrent requests: {calls:g} translate_batch calls ({single:g} of one sentence); "
          f"{64 / served_s:.0f} sentences/s served vs {64 / direct_s:.0f}/s in one direct translate_batch "
          f"({direct_s / served_s:.0%})")


def test_startup_fails_naming_a_missing_or_corrupt_model(tiny_workdir: Path, tmp_path: Path) -> None:
    serve = [sys.executable, "-m", "wdserve.cli", "serve"]
    missing = subprocess.run([*serve, "--model", f"ghost={tmp_path}/nope"], capture_output=True, text=True,
                             timeout=60)
    assert missing.returncode == 1 and "'ghost'" in missing.stderr and "does not exist" in missing.stderr

    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_workdir / "export" / "student-int8", corrupt)
    (corrupt / "model.bin").write_bytes((corrupt / "model.bin").read_bytes()[:100])
    broken = subprocess.run([*serve, "--model", f"broken={corrupt}"], capture_output=True, text=True,
                            timeout=60)
    assert broken.returncode == 1 and "'broken'" in broken.stderr and str(corrupt) in broken.stderr


def test_overload_gets_503_and_server_stays_healthy(tiny_workdir: Path) -> None:
    # configured through the environment only, as a container would be
    env = {"WDSERVE_QUEUE_SIZE": "4", "WDSERVE_MAX_BATCH_SIZE": "1", "WDSERVE_MAX_WAIT_MS": "0",
           "WDSERVE_MAX_LENGTH_LIMIT": "64", "WDSERVE_DEFAULT_MAX_LENGTH": "24"}
    running = ServerProcess(tiny_workdir, env=env)
    body = {"q": " ".join(["This book finds a tree."] * 4), "model": "teacher-float32", "beam_size": 4,
            "max_length": 64}

    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=running.url, timeout=60) as client:
            return await asyncio.gather(*[client.post("/translate", json=body) for _ in range(16)])

    try:
        responses = asyncio.run(flood())
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 503} and statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
        rejected = next(r for r in responses if r.status_code == 503)
        assert int(rejected.headers["retry-after"]) >= 1 and "error" in rejected.json()
        assert httpx.get(f"{running.url}/health", timeout=10).status_code == 200
        assert httpx.post(f"{running.url}/translate", json=body, timeout=30).status_code == 200
        text = httpx.get(f"{running.url}/metrics", timeout=10).text
        assert metric(text, "wdserve_errors_total", route="/translate", model="teacher-float32",
                      status="503") == statuses.count(503)
    finally:
        running.stop()


def test_sigterm_finishes_in_flight_requests(tiny_workdir: Path) -> None:
    running = ServerProcess(tiny_workdir, "--max-batch-size", "1", "--max-wait-ms", "0",
                            "--max-length-limit", "64", "--default-max-length", "24")
    paragraph = " ".join(["This book finds a tree."] * 8)
    body = {"q": [paragraph] * 4, "model": "teacher-float32", "beam_size": 4, "max_length": 64}
    n_requests = 6

    async def in_flight_then_sigterm() -> tuple[list[httpx.Response], Exception | None]:
        async with httpx.AsyncClient(base_url=running.url, timeout=60) as client:
            tasks = [asyncio.create_task(client.post("/translate", json=body)) for _ in range(n_requests)]
            deadline = time.monotonic() + 20
            while True:  # every request is inside the server (the metrics request itself counts one)
                text = (await client.get("/metrics")).text
                if metric(text, "wdserve_requests_in_progress") >= n_requests + 1:
                    break
                assert time.monotonic() < deadline, "requests never all reached the server"
                await asyncio.sleep(0.02)
            running.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            refused = None
            try:  # a new connection after SIGTERM must not be accepted
                async with httpx.AsyncClient(timeout=2) as fresh:
                    await fresh.get(f"{running.url}/health")
            except httpx.TransportError as err:
                refused = err
            return list(await asyncio.gather(*tasks)), refused

    try:
        responses, refused = asyncio.run(in_flight_then_sigterm())
        assert [r.status_code for r in responses] == [200] * n_requests
        assert all(len(r.json()["translatedText"]) == 4 for r in responses)
        assert refused is not None, "the server still accepted connections after SIGTERM"
        assert running.process.wait(timeout=20) in (0, -signal.SIGTERM)
    finally:
        running.stop()
