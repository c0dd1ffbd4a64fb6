"""``wdserve bench`` and the locustfile, run for a few seconds on the tiny pipeline's models.

Nothing here asserts a speed: a slow machine must not fail. The tests check that the
machinery runs end to end and that the report says what locust's own CSV says.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

pytest.importorskip("locust")
pytest.importorskip("server.app", reason="the server (server/app.py) is needed to bench over HTTP")

from loadtest.bench import LOCUSTFILE, BenchOptions, request_name, run_bench, running_server  # noqa: E402

MODELS = ("teacher", "student", "student-kd")


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
        workdir=tiny_workdir, out=out, duration=2, phases=1, low_users=1, users=2, max_sentences=12,
        beam_size=1, max_length=16, threads=1, direct_seconds=0.2, server_timeout=120,
    )
    return run_bench(options), out


def test_bench_writes_every_report_file(bench: tuple[dict, Path]):
    report, out = bench
    for name in ("report.json", "report.md", "latency.png", "throughput.png", "pareto.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for png in report["plots"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "report.json").read_text()) == report
    assert len(report["phases"]) == 2 * len(MODELS)  # one round per regime
    for phase in report["phases"]:
        assert (out / "locust" / phase["files"]["stats_csv"]).is_file()
        assert (out / "locust" / phase["files"]["html"]).is_file()
    markdown = (out / "report.md").read_text()
    assert report["verdict"] in markdown and "1.88-2.94x" in report["verdict"]
    for model in MODELS:
        assert f"| {model} |" in markdown


def test_phases_alternate_teacher_and_students_in_each_regime(bench: tuple[dict, Path]):
    report, _ = bench
    order = [(p["regime"], p["model"]) for p in report["phases"]]
    assert order == [(regime, m) for regime in ("low", "saturation") for m in MODELS]
    assert {p["users"] for p in report["phases"] if p["regime"] == "low"} == {1}
    assert {p["users"] for p in report["phases"] if p["regime"] == "saturation"} == {2}


def test_report_numbers_match_locusts_csv(bench: tuple[dict, Path]):
    report, out = bench
    for phase in report["phases"]:
        row = locust_row(out / "locust" / phase["files"]["stats_csv"], request_name(phase["served_as"]))
        assert phase["requests"] == int(row["Request Count"]) > 0
        assert phase["failures"] == int(row["Failure Count"]) == 0, phase["errors"]
        assert phase["p50_ms"] == float(row["50%"])
        assert phase["p99_ms"] == float(row["99%"])
        assert phase["requests_per_s"] == pytest.approx(float(row["Requests/s"]))
        tokens = json.loads((out / "locust" / phase["files"]["stats_csv"].replace(
            "_stats.csv", "_tokens.json")).read_text())[phase["served_as"]]
        assert tokens["responses"] == phase["requests"] and phase["tokens"] == tokens["tokens"] > 0
        assert phase["tokens_per_s"] == pytest.approx(
            float(row["Requests/s"]) * tokens["tokens"] / int(row["Request Count"]), rel=1e-3)
    for model, summary in report["models"].items():
        for regime in ("low", "saturation"):
            phases = [p for p in report["phases"] if p["model"] == model and p["regime"] == regime]
            assert summary["http"][regime]["requests"] == sum(p["requests"] for p in phases)
    teacher, student = (next(p for p in report["phases"] if p["regime"] == "saturation" and p["model"] == m)
                        for m in ("teacher", "student"))
    ratio = report["comparisons"]["student"]["throughput_ratio"]
    assert ratio["median"] == pytest.approx(student["requests_per_s"] / teacher["requests_per_s"], rel=1e-3)


def test_direct_baselines_and_quality_cover_every_export(bench: tuple[dict, Path], tiny_workdir: Path):
    report, _ = bench
    exports = sorted(p.name for p in (tiny_workdir / "export").iterdir())
    assert sorted(report["direct"]) == exports
    for direct in report["direct"].values():
        assert direct["sentences"] == 12 and direct["sentences_per_s"] > 0
        assert 0 <= direct["bleu"] <= 100 and 0 <= direct["chrf"] <= 100
    for model, summary in report["models"].items():
        assert summary["export"] == f"{model}-int8"  # the server's default preferred quantization
        assert summary["server_efficiency"] > 0
    assert report["pytorch_teacher"]["sentences"] == 12 and report["pytorch_teacher"]["sentences_per_s"] > 0


def test_bench_leaves_no_server_running(bench: tuple[dict, Path]):
    report, _ = bench
    url = urlparse(report["url"])
    with socket.socket() as sock, pytest.raises(OSError):
        sock.settimeout(2)
        sock.connect((url.hostname, url.port))


def test_locustfile_runs_standalone_headless(tiny_workdir: Path, tmp_path: Path):
    env = {**os.environ, "WDSERVE_SENTENCES": str(tiny_workdir / "data" / "test.src"),
           "WDSERVE_LOAD_MODELS": "teacher,student", "WDSERVE_LOAD_MAX_LENGTH": "16"}
    for key in ("WDSERVE_LOAD_SOURCE", "WDSERVE_LOAD_TARGET"):  # languages come from GET /models
        env.pop(key, None)
    with running_server(tiny_workdir, tmp_path / "server.log", timeout=120, extra_args=[]) as url:
        result = subprocess.run(
            [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url, "-u", "2",
             "-r", "2", "-t", "2s", "--csv", str(tmp_path / "run"), "--only-summary"],
            env=env, capture_output=True, text=True, timeout=120,
        )
    assert result.returncode == 0, result.stderr[-3000:]
    for model in ("teacher", "student"):  # one user class per model, requests named by model
        row = locust_row(tmp_path / "run_stats.csv", request_name(model))
        assert int(row["Request Count"]) > 0 and int(row["Failure Count"]) == 0
    assert set(json.loads((tmp_path / "run_tokens.json").read_text())) == {"teacher", "student"}


def test_locustfile_says_what_to_set_when_the_sentences_are_missing(tmp_path: Path):
    env = {**os.environ, "WDSERVE_SENTENCES": str(tmp_path / "absent.src")}
    result = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", "http://127.0.0.1:9",
         "-t", "1s"], env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "absent.src" in result.stderr and "WDSERVE_SENTENCES" in result.stderr
