"""The app's own CPU per translation request, the model's work left out, for versions of app.py side by side.

    git show HEAD~1:server/app.py > /tmp/app_before.py
    python tests/server/measure_overhead.py --workdir RUN --core 1 /tmp/app_before.py server/app.py

builds each app on the same registry with ``service.translate`` replaced by a canned
answer (every version shares the current ``server.service`` otherwise), drives it as
ASGI directly (no HTTP client, no sockets: what is left is routing, middleware, body
reading, checks, dependencies and rendering), and times rounds of sequential requests,
the apps taking turns round by round so a busy machine slows them alike. Prints CPU µs
per request per app and request shape: lower quartile, median and range over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from wdserve.server import service
from wdserve.server.app import load_registry
from wdserve.server.service import Translation
from wdserve.server.settings import ServeSettings


async def canned_translate(state: Any, served: Any, job: Any, *options: Any) -> Translation:
    texts = getattr(job, "texts", job)  # app.py before service.Job passed texts, beam_size, max_length
    sentences = [service.Sentence(text, f"<{text}>", served.name, 1) for text in texts]
    return Translation(served.name, service.Split([([text], []) for text in texts]), sentences, 1.0, 0.1, 0.9)


def load_app_module(path: Path, index: int) -> Any:
    spec = importlib.util.spec_from_file_location(f"measured_app_{index}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def scope_for(path: str, body: bytes, content_type: bytes) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"host", b"wdserve"), (b"content-type", content_type),
                        (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000), "state": {}}


async def post(app: Any, path: str, body: bytes, content_type: bytes = b"application/json") -> int:
    status = 0

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope_for(path, body, content_type), receive, send)
    return status


async def cpu_us_per_request(app: Any, path: str, body: bytes, content_type: bytes, n: int) -> float:
    started = time.process_time()
    for _ in range(n):
        await post(app, path, body, content_type)
    return (time.process_time() - started) / n * 1e6


async def measure(apps: list[Any], requests: list[tuple[str, str, bytes, bytes]], rounds: int,
                  n: int) -> dict[tuple[int, str], list[float]]:
    times: dict[tuple[int, str], list[float]] = {}
    for app in apps:  # every request shape answers 200 before anything is timed
        for _, path, body, content_type in requests:
            status = await post(app, path, body, content_type)
            if status != 200:
                raise RuntimeError(f"{path} answered {status}")
            await cpu_us_per_request(app, path, body, content_type, n // 4)  # warm-up
    for _ in range(rounds):
        for index, app in enumerate(apps):
            for label, path, body, content_type in requests:
                times.setdefault((index, label), []).append(
                    await cpu_us_per_request(app, path, body, content_type, n))
    return times


async def main_async(args: argparse.Namespace) -> None:
    settings = ServeSettings(workdir=args.workdir)
    registry = load_registry(settings)
    service.translate = canned_translate  # both app versions call service.translate at request time
    modules = [load_app_module(path, index) for index, path in enumerate(args.apps)]
    apps = [module.create_app(settings, registry) for module in modules]
    sentence = {"q": "this book finds a tree", "target": None}
    requests = [
        ("translate json", "/translate", json.dumps(sentence).encode(), b"application/json"),
        ("translate form", "/translate", b"q=this+book+finds+a+tree", b"application/x-www-form-urlencoded"),
        ("compare json", "/translate/compare", json.dumps(sentence).encode(), b"application/json"),
    ]
    contexts = [app.router.lifespan_context(app) for app in apps]
    for context in contexts:
        await context.__aenter__()
    try:
        times = await measure(apps, requests, args.rounds, args.n)
    finally:
        for context in contexts:
            await context.__aexit__(None, None, None)
        registry.close()
    print(f"CPU µs per request, {args.rounds} rounds of {args.n}, core {sorted(os.sched_getaffinity(0))}")
    for (index, label), values in times.items():
        quartiles = statistics.quantiles(values, n=4)
        print(f"{str(args.apps[index]):>40} {label:<15} p25 {quartiles[0]:7.1f}  median {quartiles[1]:7.1f}  "
              f"range {min(values):7.1f}-{max(values):7.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("apps", type=Path, nargs="+", help="app.py files to compare (each has create_app)")
    parser.add_argument("--workdir", type=Path, required=True, help="run directory with export/*")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("-n", type=int, default=2000, help="sequential requests per round")
    parser.add_argument("--core", type=int, default=None, help="pin the process to this core")
    args = parser.parse_args()
    if args.core is not None:
        os.sched_setaffinity(0, {args.core})
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
