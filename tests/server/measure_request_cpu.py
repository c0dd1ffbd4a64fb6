"""The server's own CPU per request over HTTP, the model replaced by a sleep, for source trees side by side.

    git archive HEAD wdserve server | tar -x -C /tmp/before
    python tests/server/measure_request_cpu.py --workdir RUN /tmp/before .

starts ``wdserve serve`` from each tree in turn (its ``wdserve/`` and ``server/`` folders,
whatever is installed), with every model's ``translate_texts`` replaced by a 25 ms sleep,
pinned to ``--server-core``; ``wrk`` on ``--load-core`` posts one sentence per request over
``--connections`` keep-alive connections for ``--seconds``. The figure is the server process's
CPU seconds (user + system, from /proc) divided by the requests wrk completed: everything the
server does per request except the model's work (uvicorn and its HTTP parser, the app, the
batcher, the thread hand-off). Trees take turns round by round so a busy machine slows them alike.
Unlike ``measure_overhead.py`` this includes uvicorn's protocol and the batcher, not just the app.

On a shared machine CPU time per request varies by 5-10% from run to run. ``--instructions``
counts instructions instead, which other processes do not change: the server runs under
valgrind's callgrind (about 50 times slower), its counters are zeroed after a warm-up, a client
here sends ``--requests`` requests over ``--connections`` connections, and the figure is the
instructions the server executed (every thread) divided by the requests. Needs valgrind.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

# Runs in the server process: import the tree's packages as wdserve.*, make the models sleep, serve.
LAUNCHER = r"""
import importlib.util, sys, time, types
from pathlib import Path
root = Path(sys.argv[1])
package = types.ModuleType("wdserve")
package.__path__ = [str(root / "wdserve")]
sys.modules["wdserve"] = package
spec = importlib.util.spec_from_file_location("wdserve.server", root / "server" / "__init__.py",
                                              submodule_search_locations=[str(root / "server")])
server = importlib.util.module_from_spec(spec)
sys.modules["wdserve.server"] = server
spec.loader.exec_module(server)
package.server = server
from wdserve.server import models
assert models.__file__.startswith(str(root)), models.__file__

OUTPUT = models.Output("translated", 1) if hasattr(models, "Output") else ("translated", 1)  # older trees

def sleeping_translate(self, batch, beam_size, max_length, *options):
    time.sleep(0.025)
    return [OUTPUT] * len(batch)

models.ServedModel.translate_texts = sleeping_translate
from wdserve.server.cli import configure_serve, run_serve
import argparse
parser = argparse.ArgumentParser()
configure_serve(parser)
run_serve(parser.parse_args(sys.argv[2:]))
"""

WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"q": "this book finds a tree", "source": "xx", "target": "yy", "model": "%s"}'
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} not ready")


async def post_requests(port: int, model: str, requests: int, connections: int) -> None:
    """``requests`` one-sentence POSTs over ``connections`` keep-alive connections, each answer checked."""
    fields = {"q": "this book finds a tree", "source": "xx", "target": "yy", "model": model}
    body = json.dumps(fields).encode()
    request = (b"POST /translate HTTP/1.1\r\nHost: wdserve\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    async def connection(count: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(count):
            writer.write(request)
            status = await reader.readline()
            assert b" 200 " in status, status
            length = 0
            while (line := await reader.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
        writer.close()

    await asyncio.gather(*(connection(requests // connections) for _ in range(connections)))


def count_instructions(tree: Path, args: argparse.Namespace, out: Path) -> float:
    """Instructions the server from ``tree`` executes per request, under callgrind."""
    port = free_port()
    dump = out / f"callgrind.{port}"
    command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={dump}", "--cache-sim=no",
               "--branch-sim=no", sys.executable, "-c", LAUNCHER, str(tree.resolve()),
               "--workdir", str(args.workdir), "--port", str(port), "--log-level", "warning",
               "--request-timeout-s", "600"]  # 50 times slower: a busy machine would pass the default
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "PYTHONMALLOC": "malloc"})
    try:
        wait_ready(f"http://127.0.0.1:{port}", process, timeout=600)
        asyncio.run(post_requests(port, args.model, 640, args.connections))  # warm-up
        subprocess.run(["callgrind_control", "--zero", str(process.pid)], capture_output=True, check=True)
        requests = args.requests // args.connections * args.connections
        asyncio.run(post_requests(port, args.model, requests, args.connections))
        subprocess.run(["callgrind_control", "--dump", str(process.pid)], capture_output=True, check=True)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
    totals = re.search(r"^totals: (\d+)", Path(f"{dump}.1").read_text(), re.M)
    return int(totals.group(1)) / requests


def measure(tree: Path, args: argparse.Namespace, script: Path) -> tuple[float, int, dict[str, int]]:
    """(server CPU µs per request, requests, non-2xx) for one wrk run against a fresh server from ``tree``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = ["taskset", "-c", str(args.server_core), sys.executable, "-c", LAUNCHER, str(tree.resolve()),
               "--workdir", str(args.workdir), "--port", str(port), "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(url, process)

        def wrk(seconds: int) -> str:
            command = ["taskset", "-c", str(args.load_core), "wrk", "-t1", f"-c{args.connections}",
                       f"-d{seconds}s", "-s", str(script), f"{url}/translate"]
            return subprocess.run(command, capture_output=True, text=True, check=True).stdout

        wrk(3)  # warm-up
        before = cpu_seconds(process.pid)
        output = wrk(args.seconds)
        used = cpu_seconds(process.pid) - before
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    requests = int(re.search(r"(\d+) requests in", output).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return used / requests * 1e6, requests, {"non_2xx": int(non_2xx.group(1)) if non_2xx else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", type=Path, nargs="+", help="source trees (each with wdserve/ and server/)")
    parser.add_argument("--workdir", type=Path, required=True, help="run directory with export/*")
    parser.add_argument("--model", default="student-int8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--server-core", type=int, default=0)
    parser.add_argument("--load-core", type=int, default=1)
    parser.add_argument("--instructions", action="store_true", help="count instructions under callgrind")
    parser.add_argument("--requests", type=int, default=3840, help="with --instructions: requests counted")
    args = parser.parse_args()
    results: dict[str, list[float]] = {str(tree): [] for tree in args.trees}
    unit = "instructions" if args.instructions else "cpu_us"
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(WRK_SCRIPT % args.model)
        for round_index in range(args.rounds):
            for tree in args.trees:
                if args.instructions:
                    value, extra = count_instructions(tree, args, Path(tmp)), {}
                else:
                    value, requests, errors = measure(tree, args, script)
                    extra = {"requests": requests, **errors}
                results[str(tree)].append(value)
                shown = {"round": round_index, "tree": str(tree), f"{unit}_per_request": round(value, 1)}
                print(json.dumps({**shown, **extra}), flush=True)
    for tree, values in results.items():
        print(f"{tree:>40}  median {statistics.median(values):9.1f} {unit.replace('cpu_us', 'µs')}  "
              f"range {min(values):9.1f}-{max(values):9.1f}  ({len(values)} runs)")


if __name__ == "__main__":
    main()
