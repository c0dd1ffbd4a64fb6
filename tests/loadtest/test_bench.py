"""``wdserve bench`` and the locustfile, run for a few seconds on the tiny pipeline's models.

Nothing here asserts a speed: a slow machine must not fail. The tests check that the
machinery runs end to end, keeps the server and locust on their own cores, and that the
report says what locust's own CSV, the locustfile's client stats and the server's CPU say.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import psutil
import pytest

pytest.importorskip("locust")
pytest.importorskip("wdserve.server.app", reason="the server (server/app.py) is needed to bench over HTTP")

from wdserve.loadtest.bench import (  # noqa: E402
    LOCUSTFILE,
    BenchOptions,
    free_port,
    request_name,
    run_bench,
    running_server,
)

MODELS = ("teacher", "student")
USERS = (1, 2)
PER_REQUEST = (1, 2)


def locust_row(stats_csv: Path, name: str) -> dict[str, str]:
    """The raw CSV row, read independently of loadtest.bench."""
    with open(stats_csv, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["Name"] == name]
    assert len(rows) == 1, f"{stats_csv} has {len(rows)} rows named {name!r}"
    return rows[0]


@pytest.fixture(scope="module")
def bench(tiny_workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench")
    options = BenchOptions(
        workdir=tiny_workdir, out=out, models=list(MODELS), duration=2, rounds=1, users=USERS,
        sentences_per_request=PER_REQUEST, min_gain=0.0, max_sentences=12, beam_size=1, max_length=16,
        direct_seconds=0.2, server_timeout=120, slo_ms=10_000, cascade_thresholds=(0.0, 1.0),
    )
    return run_bench(options), out


def test_bench_writes_every_report_file(bench: tuple[dict, Path]):
    report, out = bench
    for name in ("report.json", "report.md", "curves.png", "pareto.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for png in report["plots"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "report.json").read_text()) == report
    markdown = (out / "report.md").read_text()
    for line in report["verdict"]:
        assert line in markdown and "1.88-2.94x" in line
    for model in MODELS:
        assert f"| {model} |" in markdown
    for target in report["targets"]:
        assert target["status"] in ("met", "missed", "not measured") and target["target"] in markdown


def test_cascade_points_run_from_the_student_to_the_teacher(bench: tuple[dict, Path]):
    """Threshold 0 sends nothing to the teacher, 1 everything: the two ends are the student's and the
    teacher's own direct translations, and the served cascade routes the same shares over HTTP."""
    report, out = bench
    cascade = report["cascade"]
    assert (cascade["model"], cascade["student"], cascade["teacher"]) == ("student", "student-int8",
                                                                        "teacher-int8")
    none, every = cascade["points"]
    assert (none["threshold"], none["fallback_share"], every["fallback_share"]) == (0.0, 0.0, 1.0)
    assert none["bleu"] == report["direct"]["student-int8"]["bleu"]
    assert every["bleu"] == report["direct"]["teacher-int8"]["bleu"]
    assert [p["served_fallback_share"] for p in cascade["points"]] == [0.0, 1.0]
    assert all(p["served_bleu"] is not None for p in cascade["points"])
    assert "## Cascade: student-int8 first" in (out / "report.md").read_text()
    assert any(t["target"].startswith("cascade student -> teacher") for t in report["targets"])


def test_phases_alternate_models_at_every_level(bench: tuple[dict, Path]):
    report, _ = bench
    order = [(p["sentences_per_request"], p["users"], p["model"]) for p in report["phases"]]
    # min_gain 0 keeps every model climbing unless its throughput fell
    assert order[:2] == [(1, 1, "teacher"), (1, 1, "student")]
    for per_request in PER_REQUEST:
        for users in USERS:
            level = [m for k, u, m in order if (k, u) == (per_request, users)]
            assert level in ([], list(MODELS), ["teacher"], ["student"]), level
    assert {e["reason"] for e in report["sweep_endings"]} <= {
        "throughput stopped rising", "last level of --users reached", "load generator saturated"}


def test_report_numbers_match_locusts_csv_and_the_client_stats(bench: tuple[dict, Path]):
    report, out = bench
    for phase in report["phases"]:
        prefix = out / "locust" / phase["files"]["stats_csv"].removesuffix("_stats.csv")
        row = locust_row(Path(f"{prefix}_stats.csv"), request_name(phase["served_as"]))
        assert phase["requests"] == int(row["Request Count"]) > 0
        assert phase["failures"] == int(row["Failure Count"]) == 0, phase["errors"]
        assert phase["p50_ms"] == float(row["50%"]) and phase["p99_ms"] == float(row["99%"])
        assert phase["requests_per_s"] == pytest.approx(float(row["Requests/s"]))
        clients = [json.loads(p.read_text()) for p in out.glob(f"locust/{prefix.name}_client.*.json")]
        assert len(clients) == phase["load_processes"] >= 1
        counted = clients[0]["models"][phase["served_as"]]
        assert counted["sentences"] == counted["responses"] * phase["sentences_per_request"]
        assert phase["words_per_s"] == pytest.approx(
            float(row["Requests/s"]) * counted["words"] / counted["responses"], rel=1e-3)
        assert phase["load_cpu_s"] == pytest.approx(sum(c["cpu_s"] for c in clients), abs=1e-3)
        assert phase["load_utilization"] > 0 and phase["valid"] == (phase["load_utilization"] <= 0.9)


def test_server_cpu_and_batches_are_accounted_per_phase(bench: tuple[dict, Path]):
    report, _ = bench
    for phase in report["phases"]:
        assert phase["server_cpu_s"] > 0
        assert phase["server_cpu_ms_per_request"] == pytest.approx(
            1000 * phase["server_cpu_s"] / phase["requests"], rel=1e-3)
        assert phase["server_cpu_ms_per_sentence"] == pytest.approx(
            phase["server_cpu_ms_per_request"] / phase["sentences_per_request"], rel=1e-3)
        # the server cannot batch more sentences than its users have in flight
        assert 1 <= phase["mean_batch_size"] <= phase["users"] * phase["sentences_per_request"]
    for summary in report["models"].values():
        for per_request in map(str, PER_REQUEST):
            figures = summary["by_sentences_per_request"][per_request]
            direct = figures["direct_equal_terms"]
            assert direct is not None and direct["threads"] == report["cpus"]["direct_threads"]
            assert direct["batch_size"] == max(1, round(figures["mean_batch_size_at_peak"]))
            assert figures["overhead_ms_per_request"] == pytest.approx(
                figures["server_cpu_ms_per_request"] - int(per_request) * direct["cpu_ms_per_sentence"],
                abs=1e-3)


def test_server_and_load_generator_get_disjoint_cores(bench: tuple[dict, Path]):
    report, _ = bench
    cpus = report["cpus"]
    if len(os.sched_getaffinity(0)) < 2:
        assert cpus["shared"]
    else:
        assert not cpus["shared"] and not set(cpus["server"]) & set(cpus["load"])


def test_a_pinned_server_runs_every_thread_on_its_cores(tiny_workdir: Path, tmp_path: Path):
    cores = (min(os.sched_getaffinity(0)),)
    with running_server(tiny_workdir, tmp_path / "server.log", 120, [], cpus=cores) as server:
        threads = psutil.Process(server.pid).threads()
        assert len(threads) > 1
        assert {tuple(sorted(os.sched_getaffinity(t.id))) for t in threads} == {cores}


def test_bench_leaves_no_server_running(bench: tuple[dict, Path]):
    report, _ = bench
    url = urlparse(report["url"])
    with socket.socket() as sock, pytest.raises(OSError):
        sock.settimeout(2)
        sock.connect((url.hostname, url.port))


def test_locustfile_runs_standalone_headless(tiny_workdir: Path, tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCUST_")}
    with running_server(tiny_workdir, tmp_path / "server.log", timeout=120, extra_args=[]) as server:
        result = subprocess.run(
            [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", server.url,
             "-u", "2", "-r", "2", "-t", "2s", "--csv", str(tmp_path / "run"), "--only-summary",
             "--sentences", str(tiny_workdir / "data" / "test.src"), "--models", "teacher,student",
             "--max-length", "16", "--client-stats", str(tmp_path / "client")],
            env=env, capture_output=True, text=True, timeout=120,
        )
    assert result.returncode == 0, result.stderr[-3000:]
    for model in ("teacher", "student"):  # users take the models in turn; languages from GET /models
        row = locust_row(tmp_path / "run_stats.csv", request_name(model))
        assert int(row["Request Count"]) > 0 and int(row["Failure Count"]) == 0
    (client,) = tmp_path.glob("client.*.json")
    assert set(json.loads(client.read_text())["models"]) == {"teacher", "student"}


def test_locustfile_says_what_to_give_when_the_sentences_are_missing(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host",
         "http://127.0.0.1:9", "-t", "1s", "--sentences", str(tmp_path / "absent.src")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "absent.src" in result.stderr and "--sentences" in result.stderr


def worker_loop(master_port: int, stop: threading.Event, log_dir: Path) -> None:
    """What a load machine runs in distributed mode: a locust worker, started again after each phase's
    master has quit it. Its --sentences does not exist: workers get the sentences from the master."""
    runs = 0
    while not stop.is_set():
        with open(log_dir / f"worker-{threading.get_ident()}-{runs}.log", "w") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--worker", "--master-host",
                 "127.0.0.1", "--master-port", str(master_port), "--sentences", "/absent/on/workers.src"],
                stdout=log, stderr=subprocess.STDOUT)
        while process.poll() is None and not stop.is_set():
            time.sleep(0.1)
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)
        runs += 1


def test_bench_with_distributed_workers_accounts_every_process(tiny_workdir: Path, tmp_path: Path):
    """--locust-workers 2: every phase's locust is a master with two workers from elsewhere; the
    workers' CPU seconds and counts reach the report through the master, not a shared disk."""
    port = free_port()
    stop = threading.Event()
    workers = [threading.Thread(target=worker_loop, args=(port, stop, tmp_path), daemon=True)
               for _ in range(2)]
    for worker in workers:
        worker.start()
    try:
        report = run_bench(BenchOptions(
            workdir=tiny_workdir, out=tmp_path / "bench", models=list(MODELS), duration=2, rounds=1,
            users=(2,), min_gain=0.0, max_sentences=12, beam_size=1, max_length=16, direct_seconds=0.2,
            server_timeout=120, slo_ms=10_000, locust_workers=2, master_port=port, workers_timeout=60,
        ))
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=60)
    assert [p["model"] for p in report["phases"]] == list(MODELS)
    for phase in report["phases"]:
        prefix = tmp_path / "bench" / "locust" / phase["files"]["stats_csv"].removesuffix("_stats.csv")
        row = locust_row(Path(f"{prefix}_stats.csv"), request_name(phase["served_as"]))
        clients = [json.loads(p.read_text()) for p in prefix.parent.glob(f"{prefix.name}_client.*.json")]
        assert phase["load_processes"] == len(clients) == 3  # the master and both workers
        counted = [c["models"].get(phase["served_as"], {}).get("responses", 0) for c in clients]
        assert sorted(counted)[0] == 0 and all(n > 0 for n in sorted(counted)[1:])  # the master sends none
        assert sum(counted) == int(row["Request Count"]) > 0 and phase["failures"] == 0
        assert phase["load_cpu_s"] == pytest.approx(sum(c["cpu_s"] for c in clients), abs=1e-3)
        busiest = max(c["cpu_s"] / c["wall_s"] for c in clients)
        assert phase["load_utilization"] == pytest.approx(busiest, abs=1e-3)
        assert phase["server_cpu_s"] > 0  # the server is still the bench's own, its CPU from psutil
