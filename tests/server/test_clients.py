"""Clients that leave, dawdle or flood, against a real ``wdserve serve`` process (issue #20).

Small numbers and short deadlines; every wait is bounded generously and nothing asserts how fast
the server was, only what it did: which sentences it translated, which status it counted, which
connections it closed and what it logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from serve_helpers import ServerProcess, metric

DEADLINE_S = 1.0  # body, header and keep-alive deadlines of the module's server
WAIT_S = 30.0  # how long a test waits for something that should happen in well under a second
TEACHER = "teacher-float32"


@pytest.fixture(scope="module")
def server(tiny_workdir: Path) -> Iterator[ServerProcess]:
    # batches wait up to 30 s for 64 sentences, so queued sentences stay queued until a test decides
    running = ServerProcess(tiny_workdir, "--log-level", "info", "--max-wait-ms", "30000",
                            "--max-batch-size", "64",
                            "--body-timeout-s", str(DEADLINE_S), "--header-timeout-s", str(DEADLINE_S),
                            "--keep-alive-timeout-s", str(DEADLINE_S))
    yield running
    running.stop()


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def assert_clean_log(server: ServerProcess) -> None:
    log = server.log()
    assert "ERROR" not in log and "Traceback" not in log, log[-3000:]
    assert 'status="500"' not in server.metrics()


def http_request(path: str, body: bytes, content_length: int | None = None) -> bytes:
    length = len(body) if content_length is None else content_length
    return (f"POST {path} HTTP/1.1\r\nHost: wdserve\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode() + body


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), WAIT_S)  # everything the server sends before it closes


def test_clients_that_leave_have_their_queued_sentences_withdrawn(server: ServerProcess) -> None:
    translate = json.dumps({"q": ["this book finds a tree"] * 4, "model": TEACHER}).encode()
    compare = json.dumps({"q": "this book finds a tree", "models": [TEACHER, "student-float32"]}).encode()
    requests = [http_request("/translate", translate)] * 6 + [http_request("/translate/compare", compare)] * 2
    queued = 6 * 4 + 2  # compare queues its sentence for the first model first
    before = server.metrics()

    def counted(text: str, sample: str, **labels: str) -> float:
        return metric(text, sample, **labels) - metric(before, sample, **labels)

    async def leave_while_queued() -> None:
        connections = [await asyncio.open_connection("127.0.0.1", server.port) for _ in requests]
        for (_, writer), request in zip(connections, requests, strict=True):
            writer.write(request)
            await writer.drain()
        await asyncio.to_thread(wait_until, lambda: metric(server.metrics(), "wdserve_queue_depth",
                                                           model=TEACHER) == queued, "every sentence queued")
        for _, writer in connections:
            writer.close()

    asyncio.run(leave_while_queued())
    wait_until(lambda: counted(server.metrics(), "wdserve_cancelled_sentences_total",
                               model=TEACHER) == queued, "the sentences to be withdrawn")
    text = server.metrics()
    assert metric(text, "wdserve_queue_depth", model=TEACHER) == 0  # their places are free at once
    assert counted(text, "wdserve_requests_total", route="/translate", model=TEACHER, status="499") == 6
    assert counted(text, "wdserve_requests_total", route="/translate/compare",
                   model=f"{TEACHER}|student-float32", status="499") == 2
    # a full batch (64 sentences) starts at once; only its sentences are translated, none of the withdrawn
    full = httpx.post(f"{server.url}/translate", timeout=WAIT_S,
                      json={"q": ["this book finds a tree"] * 64, "model": TEACHER})
    assert full.status_code == 200
    assert counted(server.metrics(), "wdserve_sentences_total", model=TEACHER) == 64
    assert_clean_log(server)


def test_client_leaving_mid_body_is_counted_499_and_logged_quietly(server: ServerProcess) -> None:
    before = metric(server.metrics(), "wdserve_requests_total", route="/translate", model="-", status="499")

    async def leave_mid_body() -> None:
        for _ in range(10):
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(http_request("/translate", b'{"q": "this bo', content_length=100))
            await writer.drain()
            writer.close()

    asyncio.run(leave_mid_body())
    wait_until(lambda: metric(server.metrics(), "wdserve_requests_total", route="/translate", model="-",
                              status="499") == before + 10, "ten 499s")
    assert_clean_log(server)


def test_slow_body_gets_408_and_is_closed_while_others_are_served(server: ServerProcess) -> None:
    body = json.dumps({"q": "this book finds a tree"}).encode()

    async def dawdle(expect_continue: bool) -> tuple[bytes, float] | None:
        """(the server's answer, seconds from headers to close), or None if the whole body went out."""
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        request = http_request("/translate", b"", content_length=len(body))
        if expect_continue:  # the app starts at once and reads the body as it comes
            request = request.replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n")
        writer.write(request)
        started = time.monotonic()
        try:
            for byte in body:  # a byte every 0.2 s: 6 s in all, far past the deadline
                writer.write(bytes([byte]))
                with contextlib.suppress(asyncio.TimeoutError):
                    return await asyncio.wait_for(reader.read(), 0.2), time.monotonic() - started
        except ConnectionError:  # closed as our byte was on its way: the answer can be lost with the reset
            return b"", time.monotonic() - started
        return None

    async def scenario() -> tuple[list[tuple[bytes, float] | None], httpx.Response]:
        slow = [asyncio.create_task(dawdle(expect_continue=index % 5 == 0)) for index in range(20)]
        await asyncio.sleep(0.2)
        async with httpx.AsyncClient(timeout=WAIT_S) as client:  # a normal client is served meanwhile
            normal = await client.post(f"{server.url}/translate", json={"q": ["this book finds a tree"] * 64,
                                                                        "beam_size": 1})
        return list(await asyncio.gather(*slow)), normal

    answers, normal = asyncio.run(scenario())
    assert normal.status_code == 200
    assert None not in answers, "a slow client sent its whole body before the server closed"
    for answer, seconds in answers:
        assert seconds >= DEADLINE_S * 0.9  # not closed before its deadline
        if answer:
            answer = answer.removeprefix(b"HTTP/1.1 100 Continue\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 408 ") and b"connection: close" in answer.lower(), answer
            assert b"did not arrive within 1 s" in answer
    assert any(answer for answer, _ in answers)
    assert metric(server.metrics(), "wdserve_requests_total", route="/translate", model="-",
                  status="408") >= 20
    assert_clean_log(server)


def test_a_large_body_in_many_reads_is_served(server: ServerProcess) -> None:
    # 300 KB (JSON allows the padding) in 10 KB pieces: more than the 64 KiB the protocol buffers
    # before it must start the app, which it holds until a body is in
    # (64 sentences fill a batch: the module's server does not wait 30 s for company)
    body = json.dumps({"q": ["this book finds a tree"] * 64}).encode()[:-1] + b" " * 300_000 + b"}"

    async def send_in_pieces() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(http_request("/translate", b"", content_length=len(body)))
        for start in range(0, len(body), 10_000):
            writer.write(body[start:start + 10_000])
            await writer.drain()
            await asyncio.sleep(0.001)
        answer = await asyncio.wait_for(reader.readuntil(b"}}"), WAIT_S)
        writer.close()
        return answer

    answer = asyncio.run(send_in_pieces())
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert_clean_log(server)


def test_connections_without_a_request_are_closed(server: ServerProcess) -> None:
    async def scenario() -> dict[str, bytes]:
        idle_reader, _ = await asyncio.open_connection("127.0.0.1", server.port)
        partial_reader, partial_writer = await asyncio.open_connection("127.0.0.1", server.port)
        partial_writer.write(b"POST /translate HTTP/1.1\r\nHost: wdserve\r\n")  # headers never finish
        big_reader, big_writer = await asyncio.open_connection("127.0.0.1", server.port)
        big_writer.write(b"GET /health HTTP/1.1\r\nHost: wdserve\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
        streamed_reader, streamed_writer = await asyncio.open_connection("127.0.0.1", server.port)
        streamed_writer.write(b"GET /health HTTP/1.1\r\nHost: wdserve\r\nX-Endless: ")
        streamed = b""
        for _ in range(40):  # one header line that never ends, in reads the parser holds unfinished
            streamed_writer.write(b"a" * 1000)
            with contextlib.suppress(asyncio.TimeoutError):
                streamed = await asyncio.wait_for(streamed_reader.read(), 0.05)  # stop once answered
                break
        kept_reader, kept_writer = await asyncio.open_connection("127.0.0.1", server.port)
        kept_writer.write(b"GET /health HTTP/1.1\r\nHost: wdserve\r\n\r\n")  # answered, then idle
        readers = {"idle": idle_reader, "partial": partial_reader, "big": big_reader, "kept": kept_reader}
        closed = {name: await read_until_closed(reader) for name, reader in readers.items()}
        return {"streamed": streamed, **closed}

    closed = asyncio.run(scenario())
    assert closed["idle"] == b"" and closed["partial"] == b""
    for name in ("big", "streamed"):
        assert closed[name].startswith(b"HTTP/1.1 431 ") and b"16384 bytes" in closed[name], closed[name]
    assert closed["kept"].startswith(b"HTTP/1.1 200 ") and closed["kept"].endswith(b'{"status":"alive"}')
    assert_clean_log(server)


def test_requests_beyond_limit_concurrency_get_503(tiny_workdir: Path) -> None:
    running = ServerProcess(tiny_workdir, "--limit-concurrency", "4")

    async def scenario() -> tuple[list[int], int]:
        held = [await asyncio.open_connection("127.0.0.1", running.port) for _ in range(4)]
        statuses = []
        async with httpx.AsyncClient(timeout=WAIT_S) as client:
            for _ in range(3):
                statuses.append((await client.get(f"{running.url}/health")).status_code)
        for _, writer in held:
            writer.close()
        await asyncio.sleep(0.5)
        async with httpx.AsyncClient(timeout=WAIT_S) as client:
            after = (await client.get(f"{running.url}/health")).status_code
        return statuses, after

    try:
        statuses, after = asyncio.run(scenario())
        assert statuses == [503, 503, 503] and after == 200
    finally:
        running.stop()


def test_serve_raises_the_open_file_limit_for_its_connections() -> None:
    script = ("import resource; soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE); "
              "resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard)); "
              "from wdserve.server.cli import ensure_file_descriptors; "
              "print(ensure_file_descriptors(1000), resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)")
    shown = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                           timeout=60)
    raised, soft, hard = map(int, shown.stdout.split())
    assert raised == soft == min(1000 + 256, hard)
