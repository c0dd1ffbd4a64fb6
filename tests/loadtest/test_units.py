"""The bench's arithmetic, verdict and choices, on hand-made inputs (no timing, no server)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from loadtest.baselines import ExportInfo
from loadtest.bench import (
    choose_models,
    read_locust_stats,
    request_name,
    served_export,
    server_threads_per_model,
)
from loadtest.plots import pareto_front
from loadtest.report import classify_speedup, compare_to_teacher, spread, summarize_phases, verdict


def phase(model: str, regime: str, round_: int, rps: float, p50: float, requests: int = 10) -> dict:
    return {"model": model, "regime": regime, "round": round_, "users": 1, "requests": requests,
            "failures": 1, "requests_per_s": rps, "tokens_per_s": rps * 5, "p50_ms": p50, "p95_ms": p50 * 2,
            "p99_ms": p50 * 3, "errors": ["1x HTTP 503"]}


def comparison(median: float | None, low: float | None = None, high: float | None = None) -> dict:
    return {"throughput_ratio": {"median": median, "min": low or median, "max": high or median}}


def test_classify_speedup_against_the_papers_range():
    assert classify_speedup(1.5) == "below"
    assert classify_speedup(1.88) == "within"
    assert classify_speedup(2.5) == "within"
    assert classify_speedup(2.94) == "within"
    assert classify_speedup(3.2) == "above"


def test_verdict_judges_weight_distilled_students_only_when_there_are_some():
    comparisons = {"student": comparison(2.4, 2.2, 2.6), "student-kd": comparison(1.1)}
    line = verdict(comparisons, {"student": "wd", "student-kd": "seqkd"})
    assert "student (wd) serves 2.40x" in line and "2.20-2.60x" in line and "within" in line
    assert "student-kd" not in line
    # without a WD student every student is judged
    line = verdict({"student-kd": comparison(1.1)}, {"student-kd": "seqkd"})
    assert "student-kd (seqkd) serves 1.10x" in line and "below" in line
    assert "above" in verdict({"student": comparison(4.0)}, {"student": "wd"})
    assert "no throughput measured" in verdict({"student": comparison(None)}, {"student": "wd"})


def test_student_ratios_pair_phases_of_the_same_round():
    phases = [
        phase("teacher", "saturation", 0, 10.0, 100), phase("student", "saturation", 0, 25.0, 40),
        phase("teacher", "saturation", 1, 20.0, 100), phase("student", "saturation", 1, 30.0, 40),
        phase("teacher", "low", 0, 5.0, 200), phase("student", "low", 0, 12.0, 50),
        phase("teacher", "low", 1, 5.0, 100), phase("student", "low", 1, 12.0, 50),
    ]
    result = compare_to_teacher(phases, "student")
    assert result["throughput_ratio"]["per_round"] == [2.5, 1.5]
    assert result["throughput_ratio"]["median"] == 2.0
    assert (result["throughput_ratio"]["min"], result["throughput_ratio"]["max"]) == (1.5, 2.5)
    assert result["p50_latency_ratio"]["per_round"] == [0.25, 0.5]


def test_summary_sums_counts_and_takes_medians():
    summary = summarize_phases([phase("teacher", "low", r, rps, p50) for r, (rps, p50)
                                in enumerate([(1.0, 300), (3.0, 100), (2.0, 200)])])
    assert summary["requests"] == 30 and summary["failures"] == 3
    assert summary["requests_per_s"] == 2.0 and summary["p50_ms"] == 200 and summary["p99_ms"] == 600
    assert summary["errors"] == ["1x HTTP 503"]
    assert spread([]) == {"median": None, "min": None, "max": None, "per_round": []}


def test_pareto_front_keeps_points_nothing_beats_on_both_axes():
    points = [("teacher", 10.0, 30.0), ("student", 25.0, 29.0), ("student-kd", 25.0, 27.0),
              ("slow-bad", 5.0, 20.0)]
    assert pareto_front(points) == ["teacher", "student"]


def test_locust_stats_row_is_read_by_request_name(tmp_path: Path):
    header = ["Type", "Name", "Request Count", "Failure Count", "Median Response Time",
              "Average Response Time", "Min Response Time", "Max Response Time", "Average Content Size",
              "Requests/s", "Failures/s", "50%", "95%", "99%", "100%"]
    rows = [["POST", request_name("teacher"), "12", "2", "110", "120.5", "90", "300", "80", "4.5", "0.75",
             "110", "250", "300", "300"],
            ["", "Aggregated", "12", "2", "110", "120.5", "90", "300", "80", "4.5", "0.75", "110", "250",
             "300", "300"]]
    path = tmp_path / "x_stats.csv"
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    stats = read_locust_stats(path, "/translate teacher")
    assert (stats["requests"], stats["failures"], stats["requests_per_s"]) == (12, 2, 4.5)
    assert (stats["p50_ms"], stats["p95_ms"], stats["p99_ms"]) == (110, 250, 300)
    assert stats["percentiles_ms"]["100%"] == 300
    assert read_locust_stats(path, "/translate student")["requests"] == 0


@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_cli_rejects_non_positive_counts(value: str):
    import argparse

    from loadtest.cli import configure_bench

    parser = argparse.ArgumentParser()
    configure_bench(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--workdir", "w", "--users", value])


def export(name: str, quantization: str) -> ExportInfo:
    return ExportInfo(Path(f"/x/{name}-{quantization}"), name, quantization, "wd", "xx", "yy", 10)


def test_models_default_to_every_export_teacher_first_and_need_the_teacher():
    exports = [export(n, q) for n in ("student-kd", "teacher", "student") for q in ("int8", "float32")]
    assert choose_models(exports, None) == ["teacher", "student", "student-kd"]
    assert choose_models(exports, ["student", "teacher"]) == ["teacher", "student"]
    with pytest.raises(SystemExit, match="must include teacher"):
        choose_models(exports, ["student"])
    with pytest.raises(SystemExit, match="not exported"):
        choose_models(exports, ["teacher", "student-ws"])


def test_served_export_follows_the_alias_in_the_models_listing():
    listing = [  # the shape of the server's GET /models
        {"name": "teacher-float32", "aliases": ["teacher-float32"], "source_lang": "xx", "target_lang": "yy"},
        {"name": "teacher-int8", "aliases": ["teacher"], "source_lang": "xx", "target_lang": "yy"},
    ]
    dirs = ["teacher-float32", "teacher-int8"]
    assert served_export(listing, "teacher", dirs) == "teacher-int8"
    assert served_export(listing, "teacher-float32", dirs) == "teacher-float32"
    assert served_export({"models": listing}, "teacher", dirs) == "teacher-int8"
    assert served_export(listing, "student", dirs) is None


def test_direct_threads_follow_the_servers_default_plan():
    assert server_threads_per_model(6, cores=16) == 2
    assert server_threads_per_model(6, cores=2) == 1
    assert server_threads_per_model(1, cores=8) == 8
