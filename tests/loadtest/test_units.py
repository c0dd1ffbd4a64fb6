"""The bench's sweep, capacity and CPU arithmetic on recorded inputs (no timing, no server)."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from wdserve.artifacts import ExportDir, ExportInfo
from wdserve.loadtest.accounting import (
    BenchError,
    CpuPlan,
    batches_between,
    parse_cpus,
    read_client_stats,
    utilization,
)
from wdserve.loadtest.bench import (
    choose_models,
    read_locust_stats,
    request_name,
    served_export,
    server_threads_per_model,
)
from wdserve.loadtest.cascade import auto_thresholds, summarize
from wdserve.loadtest.cli import configure_bench
from wdserve.loadtest.plots import pareto_front
from wdserve.loadtest.report import build_report, check_targets, compare, model_figures, spread
from wdserve.loadtest.sweep import (
    capacity_at_slo,
    peak,
    sweep_done,
    tail_at_half_capacity,
    throughput_stopped_rising,
)


def phase(model: str, users: int, rps: float, p95: float, *, round_: int = 0, spr: int = 1,
          valid: bool = True, failures: int = 0, cpu_ms: float = 1.0, batch: float = 4.0) -> dict:
    """A phase record as ``run_phase`` writes it (only the fields the arithmetic reads)."""
    return {"model": model, "users": users, "round": round_, "sentences_per_request": spr,
            "requests": int(rps * 10), "failures": failures, "requests_per_s": rps,
            "sentences_per_s": rps * spr, "words_per_s": rps * spr * 9, "p50_ms": p95 / 2, "p95_ms": p95,
            "p99_ms": p95 * 1.2, "valid": valid, "server_cpu_ms_per_request": cpu_ms,
            "server_cpu_ms_per_sentence": cpu_ms / spr, "requests_per_s_per_core": rps,
            "server_utilization": 0.5, "mean_batch_size": batch, "load_utilization": 0.3}


# A teacher that saturates at ~500 req/s and a student at ~1000 req/s, p95 growing past saturation.
TEACHER = [phase("teacher", 1, 80, 14), phase("teacher", 4, 300, 18), phase("teacher", 16, 480, 40),
           phase("teacher", 64, 500, 140)]
STUDENT = [phase("student", 1, 120, 10), phase("student", 4, 440, 11), phase("student", 16, 900, 22),
           phase("student", 64, 1010, 70), phase("student", 128, 1020, 130)]


def test_a_level_that_adds_little_throughput_ends_the_sweep():
    assert not throughput_stopped_rising([100])
    assert not throughput_stopped_rising([100, 200, 400])
    assert throughput_stopped_rising([100, 400, 415])  # +3.75% < 5%
    assert throughput_stopped_rising([100, 400, 380])
    assert not throughput_stopped_rising([100, 400, 421])
    assert throughput_stopped_rising([100, 400, 430], min_gain=0.1)
    assert sweep_done(TEACHER[:3]) is None
    assert sweep_done(TEACHER) == "throughput stopped rising"
    saturated_client = [*TEACHER[:2], phase("teacher", 16, 480, 40, valid=False)]
    assert sweep_done(saturated_client) == "load generator saturated"


def test_capacity_is_the_most_requests_a_valid_level_carries_within_the_slo():
    assert capacity_at_slo(TEACHER, slo_ms=100)["users"] == 16
    assert capacity_at_slo(TEACHER, slo_ms=200)["requests_per_s"] == 500
    assert capacity_at_slo(STUDENT, slo_ms=100)["requests_per_s"] == 1010
    assert capacity_at_slo(TEACHER, slo_ms=10) is None
    # a level whose load generator was saturated, or that failed more than 1%, never counts
    invalid = [*TEACHER[:2], phase("teacher", 16, 480, 40, valid=False)]
    assert capacity_at_slo(invalid, slo_ms=100)["users"] == 4
    failing = [*TEACHER[:2], phase("teacher", 16, 480, 40, failures=49)]  # 49 of 4800 is ~1.02%
    assert capacity_at_slo(failing, slo_ms=100)["users"] == 4
    assert capacity_at_slo([*TEACHER[:2], phase("teacher", 16, 480, 40, failures=48)], 100)["users"] == 16
    assert peak(invalid)["users"] == 4


def test_tail_is_read_at_the_level_nearest_half_the_capacity():
    tail = tail_at_half_capacity(STUDENT, capacity_rps=1010)  # half: 505 -> the 4-user level (440)
    assert tail == {"users": 4, "requests_per_s": 440, "p50_ms": 5.5, "p99_ms": pytest.approx(13.2),
                    "p99_over_p50": 2.4}
    assert tail_at_half_capacity(STUDENT, 0) is None


def test_speedup_pairs_capacities_of_the_same_round():
    phases = [*TEACHER, *STUDENT,
              *(dict(p, round=1, requests_per_s=p["requests_per_s"] * 0.5) for p in TEACHER), *(
                  dict(p, round=1) for p in STUDENT)]
    figures = {m: model_figures(phases, m, f"{m}-int8", 1, 100, {}) for m in ("teacher", "student")}
    result = compare(phases, "student", 1, 100, figures)
    # round 0: 1010 / 480; round 1: 1010 / 240 (the teacher ran at half speed in that round)
    assert result["capacity_speedup"]["per_round"] == [pytest.approx(2.1042, abs=1e-4), 4.2083]
    assert result["capacity_speedup"]["median"] == pytest.approx((1010 / 480 + 1010 / 240) / 2, abs=1e-4)
    assert result["direct_speedup"] is None  # no direct run on equal terms given
    assert figures["teacher"]["capacity_users"] == [16, 16]


def test_server_overhead_is_cpu_per_request_minus_the_models_own_cpu():
    phases = [phase("teacher", 16, 480, 40, cpu_ms=1.9, batch=7.6), phase("teacher", 64, 500, 140, cpu_ms=1.7,
              batch=15.4), phase("student", 64, 1010, 70, cpu_ms=0.8, batch=11.8)]
    equal_terms = {"teacher-int8@15": {"sentences_per_s": 625.0, "cpu_ms_per_sentence": 1.55},
                   "student-int8@12": {"sentences_per_s": 1600.0, "cpu_ms_per_sentence": 0.6}}
    teacher = model_figures(phases, "teacher", "teacher-int8", 1, 200, equal_terms)
    student = model_figures(phases, "student", "student-int8", 1, 200, equal_terms)
    assert teacher["server_cpu_ms_per_request"] == 1.7  # at the peak (64 users), not at 16 users
    assert teacher["overhead_ms_per_request"] == pytest.approx(0.15)
    assert teacher["efficiency"] == pytest.approx(500 / 625)
    assert student["overhead_ms_per_request"] == pytest.approx(0.2)
    speedup = compare(phases, "student", 1, 200, {"teacher": teacher, "student": student})
    assert speedup["direct_speedup"] == pytest.approx(1600 / 625)
    assert speedup["share_of_direct_speedup"] == pytest.approx((1010 / 500) / (1600 / 625), abs=1e-3)
    # at 8 sentences per request the model's share is 8 x its per-sentence CPU
    eight = [phase("teacher", 8, 60, 140, spr=8, cpu_ms=12.6, batch=15.2)]
    figures = model_figures(eight, "teacher", "teacher-int8", 8, 200, equal_terms)
    assert figures["overhead_ms_per_request"] == pytest.approx(12.6 - 8 * 1.55)
    assert figures["efficiency"] == pytest.approx(480 / 625)


def test_targets_say_met_missed_or_not_measured():
    exports = [export(n, "int8", m) for n, m in (("teacher", "teacher"), ("student", "wd"))]
    direct = {f"{n}-int8": {"quantization": "int8", "parameters": 10, "bleu": 30.0, "chrf": 50.0,
                            "sentences_per_s": s, "sentences": 500}
              for n, s in (("teacher", 625), ("student", 1600))}
    equal_terms = {"teacher-int8@4": {"sentences_per_s": 625.0, "cpu_ms_per_sentence": 1.55},
                   "student-int8@4": {"sentences_per_s": 1600.0, "cpu_ms_per_sentence": 0.6}}
    phases = [dict(p, cpu_ms=None) | {"server_cpu_ms_per_request": 1.6 if p["model"] == "teacher" else 1.0}
              for p in (*TEACHER, *STUDENT)]
    phases[-1] = dict(phases[-1], valid=False)
    options = SimpleNamespace(slo_ms=100, sentences_per_request=(1,), workdir="w", beam_size=4,
                              max_length=256, rounds=1, duration=15, users=(1, 4, 16, 64, 128), min_gain=0.05,
                              max_sentences=500, direct_batch_size=32, direct_seconds=3, quantization=None)
    report = build_report(options, CpuPlan((0,), (1,)), 1, ["teacher", "student"],
                          {"teacher": "teacher-int8", "student": "student-int8"}, exports, direct,
                          {"skipped": "no"}, phases, [], equal_terms, "http://x")
    status = {t["target"]: (t["status"], t["figure"]) for t in report["targets"]}
    share = status["student: HTTP capacity speed-up >= 0.9 x direct speed-up"]
    assert share[0] == "missed" and "2.10x vs 2.56x direct = 0.82" in share[1]  # 1010/480 and 1600/625
    assert status["teacher: server overhead per one-sentence request <= 0.15 ms CPU"] == ("met", "0.050 ms")
    overhead = "server overhead per one-sentence request <= 0.15 ms CPU"
    assert status[f"student: {overhead}"] == ("missed", "0.400 ms")
    assert status["no phase with a saturated load generator"][0] == "missed"
    assert "1 of 9 phases" in status["no phase with a saturated load generator"][1]
    assert status["student (1 sent./request): p99 <= 3 x p50 at half capacity"][0] == "met"
    assert "2.10x the teacher's requests/s within the SLO" in report["verdict"][0]
    assert json.loads(json.dumps(report)) == report  # report.json holds exactly this
    assert check_targets(report) == report["targets"]


def test_cpu_plan_keeps_the_load_generator_off_the_servers_cores():
    assert CpuPlan.choose((0, 1)) == CpuPlan((0,), (1,))
    assert not CpuPlan.choose((0, 1)).shared
    assert CpuPlan.choose(tuple(range(16))) == CpuPlan(tuple(range(12)), (12, 13, 14, 15))
    assert CpuPlan.choose((3,)).shared  # one core: nothing to split
    assert CpuPlan.choose((0, 1, 2, 3), server=(0,)) == CpuPlan((0,), (1, 2, 3))
    assert CpuPlan.choose((0, 1, 2, 3), load=(3,)) == CpuPlan((0, 1, 2), (3,))
    with pytest.raises(BenchError, match="--server-cpus: CPU.s. 7 are not available"):
        CpuPlan.choose((0, 1), server=(7,))
    assert parse_cpus("0-2,5") == (0, 1, 2, 5)
    for bad in ("", "a", "3-1", "-1"):
        with pytest.raises(ValueError):
            parse_cpus(bad)


def test_client_stats_of_every_locust_process_are_summed(tmp_path: Path):
    for pid, (cpu, wall, words) in {11: (3.0, 15.0, 90), 12: (4.5, 15.2, 60)}.items():
        (tmp_path / f"run_client.{pid}.json").write_text(json.dumps(
            {"pid": pid, "cpu_s": cpu, "wall_s": wall,
             "models": {"teacher": {"responses": words // 9, "sentences": words // 9, "words": words}}}))
    total = read_client_stats(tmp_path / "run_client")
    assert total["processes"] == 2 and total["cpu_s"] == 7.5 and total["wall_s"] == 15.2
    assert total["models"]["teacher"] == {"responses": 16, "sentences": 16, "words": 150}
    assert utilization(7.5, 15.2, 2) == pytest.approx(7.5 / 30.4)
    assert utilization(1.0, 0.0, 1) is None
    with pytest.raises(BenchError, match="no client stats"):
        read_client_stats(tmp_path / "other")


def test_batch_sizes_come_from_the_difference_of_two_scrapes():
    key = ("model", "teacher-int8"),
    before = {("wdserve_batch_size_count", key): 10.0, ("wdserve_batch_size_sum", key): 30.0}
    after = {("wdserve_batch_size_count", key): 110.0, ("wdserve_batch_size_sum", key): 830.0}
    assert batches_between(before, after, "teacher-int8") == (100.0, 800.0)
    assert batches_between(before, after, "student-int8") == (0.0, 0.0)


def test_spread_of_nothing_is_empty():
    assert spread([]) == {"median": None, "min": None, "max": None, "per_round": []}
    assert spread([None, 2.0, 1.0, 3.0])["median"] == 2.0


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


@pytest.mark.parametrize("flag,value", [("--users", "0"), ("--users", "8,4"), ("--users", "x"),
                                        ("--rounds", "0"), ("--sentences-per-request", "1,-8"),
                                        ("--server-cpus", "2-1"), ("--slo-ms", "0")])
def test_cli_rejects_bad_values(flag: str, value: str):
    parser = argparse.ArgumentParser()
    configure_bench(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--workdir", "w", flag, value])


def test_cli_reads_lists():
    parser = argparse.ArgumentParser()
    configure_bench(parser)
    args = parser.parse_args(["--workdir", "w", "--users", "1,4,16", "--sentences-per-request", "1,8",
                              "--server-cpus", "0-2", "--load-cpus", "3"])
    assert (args.users, args.sentences_per_request) == ((1, 4, 16), (1, 8))
    assert (args.server_cpus, args.load_cpus) == ((0, 1, 2), (3,))


def export(name: str, quantization: str, method: str = "wd") -> ExportDir:
    info = ExportInfo(name, quantization, "xx", "yy", method, parameters=10)
    return ExportDir(Path(f"/x/{name}-{quantization}"), info)


def test_models_default_to_every_export_teacher_first_and_need_the_teacher():
    exports = [export(n, q) for n in ("student-kd", "teacher", "student") for q in ("int8", "float32")]
    assert choose_models(exports, None) == ["teacher", "student", "student-kd"]
    assert choose_models(exports, ["student", "teacher"]) == ["teacher", "student"]
    with pytest.raises(BenchError, match="must include teacher"):
        choose_models(exports, ["student"])
    with pytest.raises(BenchError, match="not exported"):
        choose_models(exports, ["teacher", "student-ws"])


def test_served_export_follows_the_alias_in_the_models_listing():
    listing = [  # the shape of the server's GET /models
        {"name": "teacher-float32", "aliases": [], "path": "/r/export/teacher-float32"},
        {"name": "teacher-int8", "aliases": ["teacher"], "path": "/r/export/teacher-int8"},
    ]
    dirs = ["teacher-float32", "teacher-int8"]
    assert served_export(listing, "teacher", dirs) == "teacher-int8"
    assert served_export(listing, "teacher-float32", dirs) == "teacher-float32"
    assert served_export(listing, "student", dirs) is None


def test_direct_threads_follow_the_servers_default_plan():
    assert server_threads_per_model(6, cores=16) == 2
    assert server_threads_per_model(6, cores=1) == 1
    assert server_threads_per_model(1, cores=8) == 8


def test_locust_runs_one_process_per_load_core_only_when_the_cores_are_its_own(tmp_path: Path):
    from wdserve.loadtest.bench import BenchOptions, Phase, PhaseContext, Server, locust_command

    phase = Phase(8, 0, 16, "student", "student", "student-int8")

    def command(plan: CpuPlan) -> list[str]:
        ctx = PhaseContext(Server("http://127.0.0.1:1", 1), BenchOptions(workdir=tmp_path), plan,
                           tmp_path / "s.src", ("xx", "yy"), tmp_path)
        return locust_command(phase, ctx, tmp_path / phase.prefix)

    several = command(CpuPlan((0, 1), (2, 3)))
    assert several[several.index("--processes") + 1] == "2"
    assert "--processes" not in command(CpuPlan((0,), (1,)))
    assert "--processes" not in command(CpuPlan((0, 1), (0, 1)))  # shared cores: one process
    assert several[several.index("--sentences-per-request") + 1] == "8"
    assert several[several.index("--users") + 1] == "16"


def test_auto_thresholds_send_the_given_shares_to_the_teacher() -> None:
    confidences = [0.1 * i for i in range(1, 11)]  # 0.1 .. 1.0
    thresholds = auto_thresholds(confidences, (0.1, 0.5))
    assert [sum(c < t for c in confidences) for t in thresholds] == [1, 5]


def test_cascade_summary_prices_each_threshold_against_both_ends() -> None:
    # student BLEU 30 at 300 sentences/s, teacher 40 at 100: gap 10
    direct = {"student": "s", "teacher": "t", "student_confidence": {}, "points": [
        {"threshold": 0.5, "fallback_share": 0.2, "sentences_per_s": 200.0, "bleu": 36.0, "chrf": 0.0},
        {"threshold": 0.9, "fallback_share": 0.8, "sentences_per_s": 120.0, "bleu": 39.0, "chrf": 0.0}]}
    served = [{"threshold": 0.5, "fallback_share": 0.25, "bleu": 35.5}]
    summary = summarize(direct, served, {"bleu": 40.0, "sentences_per_s": 100.0},
                        {"bleu": 30.0, "sentences_per_s": 300.0})
    first, second = summary["points"]
    assert (first["gap_closed"], first["speed_over_teacher"], first["share_of_student_speed"]) == (0.6, 2.0,
                                                                                                   0.6667)
    assert (second["gap_closed"], second["speed_over_teacher"]) == (0.9, 1.2)
    assert (first["served_bleu"], first["served_fallback_share"], second["served_bleu"]) == (35.5, 0.25, None)
    assert summary["meets_target"] == [0.5]  # 0.9 closes more of the gap but keeps only 1.2x
    assert summarize(direct, None, {"bleu": 30.0, "sentences_per_s": 100.0},
                     {"bleu": 30.0, "sentences_per_s": 300.0})["meets_target"] is None
