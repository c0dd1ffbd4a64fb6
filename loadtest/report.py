"""Bench numbers -> OUT/report.json and OUT/report.md.

The figures a user sizing a deployment needs, and how each is computed (also written into
report.json under ``definitions``). Everything is per sentences-per-request value (spr).
"""

from __future__ import annotations

import platform
import statistics
from pathlib import Path
from typing import Any

from wdserve.loadtest.cascade import GAP_TARGET, SPEED_TARGET
from wdserve.loadtest.sweep import capacity_at_slo, peak, tail_at_half_capacity

PAPER_SPEEDUP = (1.88, 2.94)  # Lin et al. (ACL 2021), student speed-ups over the teacher

# issue #13's targets
SPEEDUP_SHARE_TARGET = 0.9  # HTTP capacity speed-up >= 0.9 x the direct speed-up of the same run
OVERHEAD_TARGET_MS = 0.15  # server CPU per one-sentence request beyond the model's own work
EFFICIENCY_TARGET = 0.95  # at 8 sentences per request, server sentences/s over direct
TAIL_TARGET = 3.0  # p99 <= 3 x p50 at half of capacity

DEFINITIONS = {
    "phase": "one locust run (closed loop, --duration seconds) of one model at one user count; requests/s, "
             "failures and p50/p95/p99 are locust's CSV row for it, unchanged",
    "valid": "a phase whose load generator used at most 90% of its cores (locust processes' own CPU "
             "seconds over the test); other phases are reported but never used for a figure",
    "sweep": "per round, user counts rise until a model's throughput grows less than min_gain over its "
             "best earlier level; at every level the models run in turn, teacher first",
    "capacity_at_slo": "highest requests/s of a valid phase with p95 <= slo_ms and failures <= 1%; per "
                       "round, then median and range over rounds",
    "peak": "highest requests/s of a valid phase, whatever its latency",
    "capacity_speedup": "student capacity at SLO / teacher's, same round",
    "peak_speedup": "student peak requests/s / teacher's (medians over rounds), whatever the latency",
    "server_cpu_ms_per_request": "the server process's CPU seconds (user+system, psutil) during the phase / "
                                 "requests locust sent; at each round's peak phase, median over rounds",
    "requests_per_s_per_core": "requests/s / cores of the server's CPU set",
    "mean_batch_size": "sentences per translate_batch call in the server during the phase (from /metrics)",
    "direct_equal_terms": "CTranslate2 translate_batch without HTTP, on the server's CPU set and threads, "
                          "batches of the server's own mean size at the peak, in arrival (unsorted) order; "
                          "process CPU ms per sentence and sentences/s",
    "direct_speedup": "student direct sentences/s / teacher's, both on equal terms",
    "overhead_ms_per_request": "server CPU ms per request - spr x direct CPU ms per sentence: the service's "
                               "own cost (HTTP, JSON, validation, tokenization, batching, metrics)",
    "efficiency": "peak sentences/s over HTTP / direct sentences/s on equal terms",
    "tail_at_half_capacity": "p99 / p50 of the valid phase whose requests/s is nearest half the capacity",
    "words_per_s": "requests/s x words (whitespace-separated) of translatedText per answer",
    "direct": "every export, same sentences, batch --direct-batch-size sorted by length, server's cores and "
              "threads: throughput, one-sentence p50 and BLEU/chrF (sacreBLEU)",
    "cascade": "the student over every sentence with scores, then the teacher over those whose confidence "
               "(geometric-mean token probability) is below the threshold, direct as in 'direct'; "
               "sentences/s = sentences / (student pass + teacher pass); gap_closed = (cascade BLEU - "
               "student BLEU) / (teacher BLEU - student BLEU); served_bleu: the same thresholds through the "
               "served cascade over HTTP",
}


def spread(values: list[float | None]) -> dict[str, Any]:
    """Median, min and max of per-round values (None when there are none)."""
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "per_round": []}
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "per_round": [round(v, 4) for v in values]}


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 4) if values else None


def phases_of(phases: list[dict[str, Any]], model: str, per_request: int) -> list[dict[str, Any]]:
    return [p for p in phases if p["model"] == model and p["sentences_per_request"] == per_request]


def levels_of(phases: list[dict[str, Any]], model: str, per_request: int,
              round_: int) -> list[dict[str, Any]]:
    return [p for p in phases_of(phases, model, per_request) if p["round"] == round_]


def rounds_of(phases: list[dict[str, Any]], per_request: int) -> list[int]:
    return sorted({p["round"] for p in phases if p["sentences_per_request"] == per_request})


def peak_phase(phases: list[dict[str, Any]], model: str, per_request: int) -> dict[str, Any] | None:
    """The valid phase of ``model`` with the most requests/s over every round."""
    return peak(phases_of(phases, model, per_request))


def server_batch_size(mean_batch_size: float) -> int:
    """The whole batch size a direct run uses for the server's mean one."""
    return max(1, round(mean_batch_size))


def equal_terms_key(export: str, batch_size: int) -> str:
    """Key of a direct run on equal terms in the report: ``"<export>@<batch size>"``."""
    return f"{export}@{batch_size}"


def curve(phases: list[dict[str, Any]], model: str, per_request: int) -> list[dict[str, Any]]:
    """The throughput-latency curve: per user count, medians over the rounds' valid phases."""
    mine = phases_of(phases, model, per_request)
    points = []
    for users in sorted({p["users"] for p in mine}):
        at = [p for p in mine if p["users"] == users]
        valid = [p for p in at if p["valid"]]
        points.append({"users": users, "phases": len(at), "valid_phases": len(valid),
                       **{key: _median([p[key] for p in valid]) for key in (
                           "requests_per_s", "p50_ms", "p95_ms", "p99_ms", "server_utilization",
                           "server_cpu_ms_per_request", "mean_batch_size", "load_utilization")}})
    return points


def model_figures(phases: list[dict[str, Any]], model: str, export: str, per_request: int, slo_ms: float,
                  equal_terms: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Capacity, peak, CPU accounting, overhead and tail of one model at one spr."""
    rounds = rounds_of(phases, per_request)
    capacities = [capacity_at_slo(levels_of(phases, model, per_request, r), slo_ms) for r in rounds]
    peaks = [peak(levels_of(phases, model, per_request, r)) for r in rounds]
    capacity = spread([c["requests_per_s"] if c else None for c in capacities])
    best = peak_phase(phases, model, per_request)
    direct = None
    if best is not None and best["mean_batch_size"]:
        direct = equal_terms.get(equal_terms_key(export, server_batch_size(best["mean_batch_size"])))
    cpu_per_request = _median([p["server_cpu_ms_per_request"] for p in peaks if p])
    overhead = None
    if cpu_per_request is not None and direct is not None:
        overhead = round(cpu_per_request - per_request * direct["cpu_ms_per_sentence"], 4)
    peak_sentences = _median([p["sentences_per_s"] for p in peaks if p])
    tail = tail_at_half_capacity(phases_of(phases, model, per_request), capacity["median"] or 0.0)
    points = curve(phases, model, per_request)
    return {
        "capacity_at_slo": capacity,
        "capacity_users": [c["users"] if c else None for c in capacities],
        "peak_requests_per_s": spread([p["requests_per_s"] if p else None for p in peaks]),
        "peak_sentences_per_s": peak_sentences,
        "peak_words_per_s": _median([p["words_per_s"] for p in peaks if p]),
        "server_cpu_ms_per_request": cpu_per_request,
        "server_cpu_ms_per_sentence": _median([p["server_cpu_ms_per_sentence"] for p in peaks if p]),
        "requests_per_s_per_core": _median([p["requests_per_s_per_core"] for p in peaks if p]),
        "server_utilization_at_peak": _median([p["server_utilization"] for p in peaks if p]),
        "mean_batch_size_at_peak": _median([p["mean_batch_size"] for p in peaks if p]),
        "direct_equal_terms": direct,
        "overhead_ms_per_request": overhead,
        "efficiency": rounded(_ratio(peak_sentences, direct["sentences_per_s"] if direct else None)),
        "tail_at_half_capacity": tail,
        "one_user": next(({k: pt[k] for k in ("p50_ms", "p95_ms", "p99_ms")}
                          for pt in points if pt["users"] == 1), None),
        "curve": points,
    }


def compare(phases: list[dict[str, Any]], student: str, per_request: int, slo_ms: float,
            figures: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per-round capacity speed-up of ``student`` over the teacher, beside the direct speed-up."""
    per_round = []
    for r in rounds_of(phases, per_request):
        mine = capacity_at_slo(levels_of(phases, student, per_request, r), slo_ms)
        teacher = capacity_at_slo(levels_of(phases, "teacher", per_request, r), slo_ms)
        per_round.append(_ratio(mine["requests_per_s"] if mine else None,
                                teacher["requests_per_s"] if teacher else None))
    capacity_speedup = spread(per_round)
    direct = [figures[m]["direct_equal_terms"] for m in (student, "teacher")]
    direct_speedup = rounded(_ratio(*(d["sentences_per_s"] if d else None for d in direct)))
    peak_speedup = rounded(_ratio(figures[student]["peak_requests_per_s"]["median"],
                                 figures["teacher"]["peak_requests_per_s"]["median"]))
    return {
        "capacity_speedup": capacity_speedup,
        "peak_speedup": peak_speedup,
        "direct_speedup": direct_speedup,
        "share_of_direct_speedup": rounded(_ratio(capacity_speedup["median"], direct_speedup)),
    }


def check_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue #13's targets, each with the measured figure and met / missed / not measured."""
    targets = []

    def add(target: str, figure: str, met: bool | None) -> None:
        targets.append({"target": target, "figure": figure,
                        "status": "not measured" if met is None else "met" if met else "missed"})

    one = report["comparisons"].get("1", {})
    for student, c in one.items():
        share = c["share_of_direct_speedup"]
        add(f"{student}: HTTP capacity speed-up >= {SPEEDUP_SHARE_TARGET} x direct speed-up",
            f"{_fmt(c['capacity_speedup']['median'], '.2f')}x vs {_fmt(c['direct_speedup'], '.2f')}x direct "
            f"= {_fmt(share, '.2f')}", None if share is None else share >= SPEEDUP_SHARE_TARGET)
    for model, m in report["models"].items():
        figures = m["by_sentences_per_request"].get("1")
        if figures:
            overhead = figures["overhead_ms_per_request"]
            add(f"{model}: server overhead per one-sentence request <= {OVERHEAD_TARGET_MS} ms CPU",
                f"{_fmt(overhead, '.3f')} ms", None if overhead is None else overhead <= OVERHEAD_TARGET_MS)
        figures = m["by_sentences_per_request"].get("8")
        if figures:
            efficiency = figures["efficiency"]
            add(f"{model}: at 8 sentences per request, >= {EFFICIENCY_TARGET} of direct throughput",
                _fmt(efficiency, ".2f"), None if efficiency is None else efficiency >= EFFICIENCY_TARGET)
    cascade = report.get("cascade")
    if cascade:
        best = max(cascade["points"], key=lambda p: (p["speed_over_teacher"] >= SPEED_TARGET,
                                                     p["gap_closed"] or 0))
        add(f"cascade {cascade['model']} -> teacher: a threshold closes >= {GAP_TARGET:g} of the BLEU gap at "
            f">= {SPEED_TARGET:g}x the teacher's throughput",
            f"best: threshold {best['threshold']:.4f} closes {_fmt(best['gap_closed'], '.2f')} at "
            f"{best['speed_over_teacher']:.2f}x", None if cascade["meets_target"] is None
            else bool(cascade["meets_target"]))
    invalid = [p for p in report["phases"] if not p["valid"]]
    add("no phase with a saturated load generator",
        f"{len(invalid)} of {len(report['phases'])} phases above {int(100 * 0.9)}% (excluded from figures)",
        not invalid)
    for model, m in report["models"].items():
        for per_request, figures in m["by_sentences_per_request"].items():
            tail = figures["tail_at_half_capacity"]
            add(f"{model} ({per_request} sent./request): p99 <= {TAIL_TARGET:g} x p50 at half capacity",
                "-" if tail is None else f"p99/p50 = {tail['p99_over_p50']:.2f} at {tail['users']} users",
                None if tail is None else tail["p99_over_p50"] <= TAIL_TARGET)
    return targets


def verdict(report: dict[str, Any], paper: tuple[float, float] = PAPER_SPEEDUP) -> list[str]:
    """One line per weight-distilled student (every student when none is): capacity speed-up at SLO
    against the paper's range."""
    lines = []
    methods = {model: m["method"] for model, m in report["models"].items()}
    for per_request, comparisons in report["comparisons"].items():
        judged = [s for s in comparisons if methods.get(s) == "wd"] or list(comparisons)
        for student in judged:
            c = comparisons[student]["capacity_speedup"]
            if c["median"] is None:
                lines.append(f"{student}: no capacity within the SLO measured ({per_request} sent./request)")
                continue
            where = ("below" if c["median"] < paper[0] else "above" if c["median"] > paper[1] else "within")
            lines.append(f"{student} ({methods.get(student)}) carries {c['median']:.2f}x the teacher's "
                         f"requests/s within the SLO at {per_request} sentence(s) per request (rounds "
                         f"{c['min']:.2f}-{c['max']:.2f}x): {where} the paper's "
                         f"{paper[0]:.2f}-{paper[1]:.2f}x")
    return lines or ["no student measured: nothing to compare with the paper"]


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            names = (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
            model = next(names, "")
    except OSError:
        pass
    return {"processor": model or platform.processor(), "machine": platform.machine(),
            "python": platform.python_version()}


def build_report(options: Any, plan: Any, threads: int, models: list[str], served: dict[str, str],
                 exports: list[Any], direct: dict[str, dict[str, Any]], pytorch: dict[str, Any],
                 phases: list[dict[str, Any]], endings: list[dict[str, Any]],
                 equal_terms: dict[str, dict[str, Any]], url: str,
                 cascade: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything measured, summarized: see DEFINITIONS."""
    methods = {e.info.name: e.info.method for e in exports}
    per_model = {}
    for model in models:
        export = served[model]
        per_model[model] = {
            "method": methods.get(model),
            "export": export,
            "quantization": direct[export]["quantization"],
            "parameters": direct[export]["parameters"],
            "bleu": direct[export]["bleu"],
            "chrf": direct[export]["chrf"],
            "by_sentences_per_request": {
                str(k): model_figures(phases, model, export, k, options.slo_ms, equal_terms)
                for k in options.sentences_per_request},
        }
    comparisons = {
        str(k): {student: compare(phases, student, k, options.slo_ms,
                                  {m: per_model[m]["by_sentences_per_request"][str(k)] for m in models})
                 for student in models[1:]}
        for k in options.sentences_per_request}
    for k, students in comparisons.items():
        for student, c in students.items():
            c["direct_batch32_speedup"] = rounded(_ratio(direct[served[student]]["sentences_per_s"],
                                                        direct[served["teacher"]]["sentences_per_s"]))
            c["peak_vs_pytorch_teacher"] = rounded(_ratio(
                per_model[student]["by_sentences_per_request"][k]["peak_sentences_per_s"],
                pytorch.get("sentences_per_s")))
    settings = {key: _plain(getattr(options, key)) for key in (
        "beam_size", "max_length", "rounds", "duration", "users", "sentences_per_request", "slo_ms",
        "min_gain", "max_sentences", "direct_batch_size", "direct_seconds", "quantization")}
    report = {
        "url": url,
        "workdir": str(options.workdir),
        "machine": machine(),
        "cpus": {**plan.describe(), "direct_threads": threads},
        "settings": {**settings, "sentences": direct[served["teacher"]]["sentences"]},
        "definitions": DEFINITIONS,
        "paper_speedup": list(PAPER_SPEEDUP),
        "models": per_model,
        "comparisons": comparisons,
        "direct": direct,
        "direct_equal_terms": equal_terms,
        "pytorch_teacher": pytorch,
        "sweep_endings": endings,
        "phases": phases,
    }
    if cascade is not None:
        report["cascade"] = cascade
    report["targets"] = check_targets(report)
    report["verdict"] = verdict(report)
    return report


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _fmt(value: Any, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.0f}%"


def _fmt_spread(values: dict[str, Any], spec: str = ".2f", unit: str = "") -> str:
    if values["median"] is None:
        return "-"
    if values["min"] == values["max"]:
        return f"{values['median']:{spec}}{unit}"
    return f"{values['median']:{spec}}{unit} ({values['min']:{spec}}-{values['max']:{spec}})"


def render_markdown(report: dict[str, Any]) -> str:
    s, cpus = report["settings"], report["cpus"]
    lines = [
        "# wdserve bench",
        "",
        f"Machine: {report['machine']['processor']}; server on CPU(s) {cpus['server']}, load generator "
        f"(locust FastHttpUser) on {cpus['load']}{' (shared!)' if cpus['shared'] else ''}; direct runs "
        f"on the server's CPU(s) with {cpus['direct_threads']} thread(s). {s['sentences']} test sentences, "
        f"beam "
        f"{s['beam_size']}, max length {s['max_length']}; {s['rounds']} round(s) of {s['duration']:g} s "
        f"phases at {', '.join(map(str, s['users']))} users (a model stops when throughput grows < "
        f"{100 * s['min_gain']:g}%); SLO: p95 <= {s['slo_ms']:g} ms. Server: {report['url']}.",
    ]
    models = report["models"]
    for key in map(str, s["sentences_per_request"]):
        comparisons = report["comparisons"][key]
        lines += [
            "", f"## {key} sentence(s) per request", "",
            "| model | capacity at SLO req/s | peak req/s | speed-up at SLO | at peak | direct speed-up "
            "| share | p50 / p95 / p99 ms (1 user) | p99/p50 at half capacity | BLEU | chrF |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for model, m in models.items():
            f, c = m["by_sentences_per_request"][key], comparisons.get(model)
            one, tail = f["one_user"] or {}, f["tail_at_half_capacity"]
            lines.append(
                f"| {model} | {_fmt_spread(f['capacity_at_slo'], '.1f')} "
                f"| {_fmt_spread(f['peak_requests_per_s'], '.1f')} "
                f"| {_fmt_spread(c['capacity_speedup'], '.2f', 'x') if c else '1'} "
                f"| {_fmt(c['peak_speedup'], '.2f') + 'x' if c else '1'} "
                f"| {_fmt(c['direct_speedup'], '.2f') + 'x' if c else '1'} "
                f"| {_fmt(c['share_of_direct_speedup'], '.2f') if c else '-'} "
                f"| {_fmt(one.get('p50_ms'), '.0f')} / {_fmt(one.get('p95_ms'), '.0f')} / "
                f"{_fmt(one.get('p99_ms'), '.0f')} | {_fmt(tail['p99_over_p50'], '.2f') if tail else '-'} "
                f"| {_fmt(m['bleu'], '.2f')} | {_fmt(m['chrf'], '.2f')} |")
        lines += [
            "", "Server cost at each round's peak (medians); direct CTranslate2 on equal terms:", "",
            "| model | server CPU ms/request | ms/sentence | req/s per core | server busy | mean batch "
            "| direct CPU ms/sentence | direct sent/s | overhead ms/request | efficiency |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for model, m in models.items():
            f = m["by_sentences_per_request"][key]
            d = f["direct_equal_terms"] or {}
            lines.append(
                f"| {model} | {_fmt(f['server_cpu_ms_per_request'], '.3f')} "
                f"| {_fmt(f['server_cpu_ms_per_sentence'], '.3f')} "
                f"| {_fmt(f['requests_per_s_per_core'])} | {_fmt(f['server_utilization_at_peak'], '.2f')} "
                f"| {_fmt(f['mean_batch_size_at_peak'], '.1f')} "
                f"| {_fmt(d.get('cpu_ms_per_sentence'), '.3f')} "
                f"| {_fmt(d.get('sentences_per_s'))} | {_fmt(f['overhead_ms_per_request'], '.3f')} "
                f"| {_fmt(f['efficiency'], '.2f')} |")
        lines += ["", "Throughput-latency curve (median req/s / p95 ms over valid phases):", "",
                  "| users | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
        curves = {model: {pt["users"]: pt for pt in m["by_sentences_per_request"][key]["curve"]}
                  for model, m in models.items()}
        for users in sorted({u for c in curves.values() for u in c}):
            cells = []
            for model in models:
                pt = curves[model].get(users)
                if pt is None:
                    cells.append("")
                    continue
                flag = "" if pt["valid_phases"] == pt["phases"] else " (!)"
                cells.append(f"{_fmt(pt['requests_per_s'])} / {_fmt(pt['p95_ms'], '.0f')}{flag}")
            lines.append(f"| {users} | " + " | ".join(cells) + " |")
    lines += ["", "## Targets", ""]
    lines += [f"- **{t['status']}**: {t['target']}: {t['figure']}" for t in report["targets"]]
    lines += [
        "", "## Without HTTP (every export; the Pareto view)", "",
        "| export | method | quantization | parameters | sentences/s | p50 ms (1 sentence) | BLEU | chrF |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, d in report["direct"].items():
        lines.append(f"| {name} | {d['method']} | {d['quantization']} | {d['parameters'] or '-'} "
                     f"| {_fmt(d['sentences_per_s'])} | {_fmt(d['p50_ms'], '.2f')} "
                     f"| {_fmt(d['bleu'], '.2f')} | {_fmt(d['chrf'], '.2f')} |")
    pytorch = report["pytorch_teacher"]
    if "skipped" in pytorch:
        lines.append(f"\nPyTorch teacher: {pytorch['skipped']}.")
    else:
        lines.append(f"| teacher (PyTorch checkpoint) | teacher | float32 | - "
                     f"| {_fmt(pytorch['sentences_per_s'])} | - | {_fmt(pytorch['bleu'], '.2f')} "
                     f"| {_fmt(pytorch['chrf'], '.2f')} |")
    cascade = report.get("cascade")
    if cascade:
        lines += [
            "", f"## Cascade: {cascade['student']} first, {cascade['teacher']} below the threshold", "",
            f"Student confidence on the test set: min {cascade['student_confidence']['min']:.3f}, median "
            f"{cascade['student_confidence']['median']:.3f}, max {cascade['student_confidence']['max']:.3f}. "
            f"Ends: student BLEU {cascade['student_bleu']:.2f} at {cascade['student_sentences_per_s']:.1f} "
            f"sentences/s, teacher {cascade['teacher_bleu']:.2f} at {cascade['teacher_sentences_per_s']:.1f} "
            "(direct, as every point here).", "",
            "| threshold | to the teacher | sentences/s | x teacher | x student | BLEU | chrF | gap closed "
            "| served BLEU | served to the teacher |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for p in cascade["points"]:
            lines.append(
                f"| {p['threshold']:.4f} | {100 * p['fallback_share']:.0f}% | {p['sentences_per_s']:.1f} "
                f"| {p['speed_over_teacher']:.2f} | {p['share_of_student_speed']:.2f} | {p['bleu']:.2f} "
                f"| {p['chrf']:.2f} | {_fmt(p['gap_closed'], '.2f')} | {_fmt(p['served_bleu'], '.2f')} "
                f"| {_percent(p['served_fallback_share'])} |")
    lines += ["", *report["verdict"], "",
              "Definitions: see `definitions` in report.json. Locust's own CSV, HTML and log of every phase "
              "are in `locust/`; `(!)` marks a level where a phase had a saturated load generator."]
    if report.get("plots"):
        lines += [""] + [f"![{Path(p).stem}]({p})" for p in report["plots"]]
    return "\n".join(lines) + "\n"


def write_markdown(report: dict[str, Any], path: Path) -> None:
    Path(path).write_text(render_markdown(report), encoding="utf-8")
