"""`docker compose up` on a real engine, as a user runs it, step by step.

    WDSERVE_COMPOSE_SMOKE=1 python3 -m pytest -s -p no:cacheprovider tests/docker/test_compose_smoke.py

builds the images, brings the stack up (tiny pipeline, then a server, then the nginx balancer),
translates through the balancer, scales to two replicas and checks both serve, stops a replica
under load with no failed request, runs the bench profile with two locust workers until its report
is written, and checks `down -v` leaves no container, volume or network behind. It runs under its
own project name and host port, so a stack of yours is left alone.

Skips where there is no Docker engine (CI has none), and unless WDSERVE_COMPOSE_SMOKE=1: it builds
three images (the train image alone is 1.5 GB with CPU-only torch, 5.5 GB with the CUDA build; set
TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu for the former) and takes minutes. Works with
the compose plugin (v2) and with docker-compose v1, which rejects the top-level `name:` key: v1 gets
a copy of compose.yaml without it, read from the repository root.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROJECT = "wdserve-smoke"
STEP_TIMEOUT_S = 3600  # first build: minutes of pip; the tiny pipeline: minutes on two cores


def engine_problem() -> str | None:
    """Why the smoke test cannot run here, or None."""
    if shutil.which("docker") is None:
        return "no docker CLI on PATH"
    info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"],
                          capture_output=True, text=True)
    if info.returncode != 0:
        return f"no Docker engine answers (`docker info`: {info.stderr.strip().splitlines()[-1:]})"
    if compose_command() is None:
        return "neither `docker compose` (v2) nor `docker-compose` (v1) is installed"
    return None


def compose_command() -> list[str] | None:
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


_problem = engine_problem()
pytestmark = [
    pytest.mark.skipif(_problem is not None, reason=f"compose smoke test needs a Docker engine: {_problem}"),
    pytest.mark.skipif(os.environ.get("WDSERVE_COMPOSE_SMOKE") != "1",
                       reason="builds three images and runs the stack for minutes: "
                              "set WDSERVE_COMPOSE_SMOKE=1"),
    pytest.mark.timeout(STEP_TIMEOUT_S),
]


def log(message: str) -> None:
    print(f"[smoke {time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Stack:
    """The compose project under test, driven through the compose CLI."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        base = compose_command()
        assert base is not None
        compose_file = REPO / "compose.yaml"
        self.version = "v2" if base == ["docker", "compose"] else "v1"
        if self.version == "v1":  # v1 rejects `name:`; the project name comes from -p either way
            text = compose_file.read_text(encoding="utf-8")
            compose_file = tmp / "compose.v1.yaml"
            compose_file.write_text("".join(line for line in text.splitlines(keepends=True)
                                            if not line.startswith("name:")), encoding="utf-8")
        self.base = [*base, "-p", PROJECT, "--project-directory", str(REPO), "-f", str(compose_file)]
        self.env = {**os.environ, "WDSERVE_PUBLISH_PORT": str(self.port), "COMPOSE_PROJECT_NAME": PROJECT}

    def __call__(self, *args: str, timeout: float = 600, check: bool = True, env: dict[str, str] | None = None
                 ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*self.base, *args], cwd=REPO, capture_output=True, text=True,
                                timeout=timeout, env={**self.env, **(env or {})})
        if check and result.returncode != 0:
            raise AssertionError(f"compose {' '.join(args)} exited {result.returncode}:\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def containers(self, service: str, everything: bool = False) -> list[str]:
        filters = ["--filter", f"label=com.docker.compose.project={PROJECT}",
                   "--filter", f"label=com.docker.compose.service={service}"]
        out = docker("ps", "-q", *(["-a"] if everything else []), *filters)
        return sorted(out.split())


def docker(*args: str, timeout: float = 120) -> str:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"docker {' '.join(args)}: {result.stderr[-2000:]}"
    return result.stdout


def inspect(container: str, template: str) -> str:
    return docker("inspect", "--format", template, container).strip()


def wait_for(what: str, condition, timeout: float, every: float = 2.0):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def post_translate(url: str, text: str, timeout: float = 30) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/translate", data=json.dumps({"q": text}).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, {"error": err.read().decode(errors="replace")[:300]}
    except OSError as err:
        return 0, {"error": str(err)}


def translate_requests_served(container: str) -> float:
    """POST /translate requests this replica answered, from its own /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = docker("exec", container, "python", "-c",
                  "import urllib.request; print(urllib.request.urlopen("
                  "'http://127.0.0.1:8000/metrics', timeout=10).read().decode())")
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "wdserve_requests_total" and sample.labels.get("route") == "/translate")


def healthy_servers(stack: Stack) -> list[str]:
    return [c for c in stack.containers("server") if inspect(c, "{{.State.Health.Status}}") == "healthy"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("compose"))
    log(f"compose {stack.version}, project {PROJECT}, balancer on {stack.url}")
    stack("--profile", "bench", "down", "-v", "--remove-orphans", check=False)  # an earlier run's leftovers
    try:
        yield stack
    finally:
        logs = stack("--profile", "bench", "logs", "--no-color", "--tail", "40", check=False).stdout
        log("last log lines of every service:\n" + logs[-6000:])
        stack("--profile", "bench", "down", "-v", "--remove-orphans", check=False)


def test_1_images_build(stack: Stack) -> None:
    started = time.monotonic()
    stack("--profile", "bench", "build", timeout=STEP_TIMEOUT_S)
    sizes = {image: int(docker("image", "inspect", "--format", "{{.Size}}", image))
             for image in ("wdserve-serve:0.1.0", "wdserve-train:0.1.0", "wdserve-loadtest:0.1.0")}
    log(f"built in {time.monotonic() - started:.0f}s: "
        + ", ".join(f"{image} {size / 1e9:.2f} GB" for image, size in sizes.items()))


def test_2_serving_image_has_no_build_tools_and_runs_unprivileged(stack: Stack) -> None:
    probe = ("import importlib.util, os, shutil; print(os.getuid(), [t for t in ('gcc', 'cc', 'make', 'g++') "
             "if shutil.which(t)], [m for m in ('pip', 'setuptools', 'wheel', 'torch') "
             "if importlib.util.find_spec(m) and '/opt/venv/' in importlib.util.find_spec(m).origin])")
    out = docker("run", "--rm", "--entrypoint", "python", "wdserve-serve:0.1.0", "-c", probe).strip()
    log(f"serving image: uid, compilers, installers/torch in /opt/venv: {out}")
    assert out == "10001 [] []"


def test_3_up_runs_the_pipeline_then_serves_through_the_balancer(stack: Stack) -> None:
    started = time.monotonic()
    stack("up", "-d", timeout=STEP_TIMEOUT_S)
    (pipeline,) = stack.containers("pipeline", everything=True)
    assert inspect(pipeline, "{{.State.Status}} {{.State.ExitCode}}") == "exited 0"
    def answered() -> tuple[int, dict] | None:
        result = post_translate(stack.url, "the big dog sees a red car")
        return result if result[0] == 200 else None

    status, body = wait_for("a translation through the balancer", answered, timeout=180)
    log(f"pipeline + up in {time.monotonic() - started:.0f}s; POST /translate -> {status} {body}")
    assert isinstance(body["translatedText"], str) and body["translatedText"].strip()
    assert body["model"].startswith("student")


def test_4_two_replicas_both_serve(stack: Stack) -> None:
    stack("up", "-d", "--no-deps", "--no-recreate", "--scale", "server=2", "server", timeout=600)
    servers = wait_for("two healthy server replicas", lambda: len(healthy_servers(stack)) == 2
                       and healthy_servers(stack), timeout=180)
    time.sleep(6)  # nginx re-resolves `server` every 5 s (resolver valid=5s)
    before = {c: translate_requests_served(c) for c in servers}
    statuses = Counter(post_translate(stack.url, f"the small cat sees {i} birds")[0] for i in range(60))
    served = {c[:12]: int(translate_requests_served(c) - before[c]) for c in servers}
    log(f"60 requests over 2 replicas: statuses {dict(statuses)}, per replica {served}")
    assert statuses == {200: 60}
    assert sum(served.values()) == 60 and all(n > 0 for n in served.values())


def test_5_a_replica_stopped_under_load_fails_no_request(stack: Stack) -> None:
    servers = healthy_servers(stack)
    assert len(servers) == 2
    results: list[int] = []
    stop = threading.Event()

    def client(number: int) -> None:
        i = 0
        while not stop.is_set():
            results.append(post_translate(stack.url, f"a red bird {number} sees {i} dogs", timeout=60)[0])
            i += 1

    clients = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for thread in clients:
        thread.start()
    time.sleep(3)
    stopped = servers[0]
    docker("stop", stopped, timeout=120)  # SIGTERM: the replica drains, then exits
    time.sleep(5)
    stop.set()
    for thread in clients:
        thread.join(timeout=120)
    statuses = Counter(results)
    exit_state = inspect(stopped, "{{.State.Status}} {{.State.ExitCode}}")
    log(f"{len(results)} requests while stopping one of 2 replicas: {dict(statuses)}; stopped replica: "
        f"{exit_state}")
    assert statuses == {200: len(results)} and len(results) > 20
    assert exit_state == "exited 0"


def test_6_bench_profile_with_two_locust_workers_writes_its_report(stack: Stack) -> None:
    started = time.monotonic()
    env = {"BENCH_WORKERS": "2", "BENCH_USERS": "2", "BENCH_DURATION": "3", "BENCH_ROUNDS": "1"}
    stack("--profile", "bench", "up", "-d", "--no-deps", "--scale", "bench-worker=2", "bench", "bench-worker",
          env=env, timeout=STEP_TIMEOUT_S)
    (bench,) = stack.containers("bench", everything=True)
    assert len(stack.containers("bench-worker", everything=True)) == 2
    def finished() -> str | None:
        state = inspect(bench, "{{.State.Status}} {{.State.ExitCode}}")
        return state if state.startswith("exited") else None

    state = wait_for("the bench to finish", finished, timeout=1200, every=5)
    assert state == "exited 0", docker("logs", "--tail", "60", bench)
    report = json.loads(stack("--profile", "bench", "run", "--rm", "--no-deps", "--entrypoint", "cat",
                              "bench", "/runs/tiny/bench/report.json", env=env).stdout)
    phases = report["phases"]
    log(f"bench (2 locust workers) in {time.monotonic() - started:.0f}s: "
        + "; ".join(f"{p['model']} {p['requests_per_s']} req/s p95 {p['p95_ms']} ms, {p['load_processes']} "
                    f"locust processes, busiest {p['load_busiest_process']}" for p in phases))
    assert phases and all(p["requests"] > 0 and p["failures"] == 0 for p in phases)
    assert all(p["load_processes"] == 3 for p in phases)  # the master and both workers reported
    # the workers' loops end with the bench (its name stops resolving)
    wait_for("the locust workers to exit", lambda: not stack.containers("bench-worker"), timeout=60, every=3)


def test_7_down_leaves_nothing_running(stack: Stack) -> None:
    stack("--profile", "bench", "down", "-v", "--remove-orphans", timeout=600)
    label = f"label=com.docker.compose.project={PROJECT}"
    left = {kind: docker(*command, "--filter", label).split()
            for kind, command in (("containers", ("ps", "-aq")), ("volumes", ("volume", "ls", "-q")),
                                  ("networks", ("network", "ls", "-q")))}
    log(f"after down -v: {left}")
    assert left == {"containers": [], "volumes": [], "networks": []}


if __name__ == "__main__":
    sys.exit(pytest.main(["-s", "-p", "no:cacheprovider", __file__]))
