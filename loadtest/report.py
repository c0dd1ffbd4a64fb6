"""Bench numbers -> OUT/report.json and OUT/report.md.

Definitions (also written into report.json under ``definitions``):

- per phase, requests, failures, requests/s and p50/p95/p99 come from locust's
  ``*_stats.csv`` row of that phase's model, unchanged; tokens/s = requests/s x
  tokens per request counted by the locustfile (whitespace words of the answers);
- per model and regime, the summary is the median over phases (sums for counts);
- a student's throughput ratio is its saturation requests/s over the teacher's in
  the same round, its p50 latency ratio its low-concurrency p50 over the teacher's
  in the same round; both are given as median, min and max over rounds;
- server efficiency = HTTP saturation requests/s / direct CTranslate2 sentences/s
  of the same export directory (one sentence per request, so the units agree).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

PAPER_SPEEDUP = (1.88, 2.94)  # Lin et al. (ACL 2021), student speed-ups over the teacher

DEFINITIONS = {
    "requests_per_s": "locust Requests/s of the phase's request name (failures included, as locust counts)",
    "tokens_per_s": "requests/s x target tokens per request; tokens = whitespace words of translatedText",
    "latency_ms": "locust's 50%/95%/99% columns for the phase (locust rounds to 2 significant digits)",
    "summary": "median over the phases of one regime; requests and failures are sums",
    "throughput_ratio": "student saturation requests/s / teacher's, same round (higher is better)",
    "p50_latency_ratio": "student low-concurrency p50 / teacher's, same round (lower is better)",
    "server_efficiency": "HTTP saturation requests/s / direct CTranslate2 sentences/s, same export",
    "direct": "CTranslate2 translate_batch over the same sentences, no HTTP, settings.threads threads; "
              "p50 is one sentence at a time",
}


def spread(values: list[float]) -> dict[str, Any]:
    """Median, min and max of per-round values (None when there are none)."""
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "per_round": []}
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "per_round": [round(v, 4) for v in values]}


def summarize_phases(phases: list[dict[str, Any]]) -> dict[str, Any]:
    """One regime of one model: counts summed, rates and percentiles the median over phases."""
    def median_of(key: str) -> float | None:
        values = [p[key] for p in phases if p[key] is not None]
        return round(statistics.median(values), 3) if values else None

    return {
        "phases": len(phases),
        "users": phases[0]["users"] if phases else None,
        "requests": sum(p["requests"] for p in phases),
        "failures": sum(p["failures"] for p in phases),
        "requests_per_s": median_of("requests_per_s"),
        "tokens_per_s": median_of("tokens_per_s"),
        "p50_ms": median_of("p50_ms"),
        "p95_ms": median_of("p95_ms"),
        "p99_ms": median_of("p99_ms"),
        "errors": sorted({e for p in phases for e in p["errors"]}),
    }


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def compare_to_teacher(phases: list[dict[str, Any]], student: str) -> dict[str, Any]:
    """Per-round ratios of ``student`` to the teacher (see the module docstring)."""
    def by_round(regime: str, model: str, key: str) -> dict[int, float | None]:
        return {p["round"]: p[key] for p in phases if p["regime"] == regime and p["model"] == model}

    def ratios(regime: str, key: str) -> list[float | None]:
        student_values, teacher_values = by_round(regime, student, key), by_round(regime, "teacher", key)
        return [_ratio(student_values[r], teacher_values.get(r)) for r in sorted(student_values)]

    return {
        "throughput_ratio": spread(ratios("saturation", "requests_per_s")),
        "p50_latency_ratio": spread(ratios("low", "p50_ms")),
    }


def classify_speedup(speedup: float, paper: tuple[float, float] = PAPER_SPEEDUP) -> str:
    """'below', 'within' or 'above' the paper's range of speed-ups."""
    if speedup < paper[0]:
        return "below"
    return "above" if speedup > paper[1] else "within"


def verdict(comparisons: dict[str, dict[str, Any]], methods: dict[str, str],
            paper: tuple[float, float] = PAPER_SPEEDUP) -> str:
    """One line: the weight-distilled students' throughput speed-up against the paper's range.

    Judged on the median saturation throughput ratio of the students whose method is
    "wd"; when none is "wd", on every student.
    """
    judged = [s for s in comparisons if methods.get(s) == "wd"] or list(comparisons)
    parts = []
    for student in judged:
        ratio = comparisons[student]["throughput_ratio"]
        if ratio["median"] is None:
            parts.append(f"{student}: no throughput measured")
            continue
        where = classify_speedup(ratio["median"], paper)
        parts.append(f"{student} ({methods.get(student, '?')}) serves {ratio['median']:.2f}x the teacher's "
                     f"requests/s (rounds {ratio['min']:.2f}-{ratio['max']:.2f}x): {where} the paper's "
                     f"{paper[0]:.2f}-{paper[1]:.2f}x")
    if not parts:
        return "no student measured: nothing to compare with the paper"
    return "Verdict: " + "; ".join(parts) + "."


def build_report(options: Any, models: list[str], served: dict[str, str], exports: list[Any],
                 direct: dict[str, dict[str, Any]], pytorch: dict[str, Any], phases: list[dict[str, Any]],
                 url: str) -> dict[str, Any]:
    """Everything measured, summarized: see DEFINITIONS."""
    methods = {e.name: e.method for e in exports}
    per_model = {}
    for model in models:
        export = served[model]
        http = {regime: summarize_phases([p for p in phases if p["model"] == model and p["regime"] == regime])
                for regime in ("low", "saturation")}
        per_model[model] = {
            "method": methods.get(model),
            "served_as": next((p["served_as"] for p in phases if p["model"] == model), None),
            "export": export,
            "quantization": direct[export]["quantization"],
            "parameters": direct[export]["parameters"],
            "http": http,
            "direct": {k: direct[export][k] for k in ("sentences_per_s", "tokens_per_s", "p50_ms")},
            "server_efficiency": _round(_ratio(http["saturation"]["requests_per_s"],
                                               direct[export]["sentences_per_s"])),
            "server_latency_overhead_ms": None if http["low"]["p50_ms"] is None else _round(
                http["low"]["p50_ms"] - direct[export]["p50_ms"]),
            "bleu": direct[export]["bleu"],
            "chrf": direct[export]["chrf"],
        }
    comparisons = {student: compare_to_teacher(phases, student) for student in models[1:]}
    for student, comparison in comparisons.items():
        teacher_direct = direct[served["teacher"]]["sentences_per_s"]
        comparison["direct_throughput_ratio"] = _round(
            _ratio(direct[served[student]]["sentences_per_s"], teacher_direct))
        pytorch_rate = pytorch.get("sentences_per_s")
        comparison["throughput_vs_pytorch_teacher"] = _round(
            _ratio(per_model[student]["http"]["saturation"]["requests_per_s"], pytorch_rate))
    settings = {key: getattr(options, key) for key in (
        "beam_size", "max_length", "phases", "duration", "low_users", "users", "spawn_rate", "max_sentences",
        "threads", "direct_batch_size", "direct_seconds", "quantization")}
    return {
        "url": url,
        "workdir": str(options.workdir),
        "settings": {**settings, "sentences": direct[served["teacher"]]["sentences"]},
        "definitions": DEFINITIONS,
        "paper_speedup": list(PAPER_SPEEDUP),
        "models": per_model,
        "comparisons": comparisons,
        "direct": direct,
        "pytorch_teacher": pytorch,
        "phases": phases,
        "verdict": verdict(comparisons, methods),
    }


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def _fmt(value: Any, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _fmt_spread(ratio: dict[str, Any]) -> str:
    if ratio["median"] is None:
        return "-"
    return f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f})"


def render_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        "# wdserve bench",
        "",
        f"{s['sentences']} test sentences, beam {s['beam_size']}, max length {s['max_length']}; "
        f"{s['phases']} round(s) per regime of {s['duration']:g}s phases; low concurrency: {s['low_users']} "
        f"user(s), saturation: {s['users']} users. Server: {report['url']}.",
        "",
        "## Over HTTP",
        "",
        "| model | export | req/s (sat.) | tokens/s (sat.) | p50 / p95 / p99 ms (low) | failures "
        "| speed-up vs teacher | p50 ratio | direct CT2 sent/s | server efficiency | BLEU | chrF |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, m in report["models"].items():
        low, sat = m["http"]["low"], m["http"]["saturation"]
        comparison = report["comparisons"].get(model)
        lines.append(
            f"| {model} | {m['export']} | {_fmt(sat['requests_per_s'], '.2f')} | {_fmt(sat['tokens_per_s'])} "
            f"| {_fmt(low['p50_ms'], '.0f')} / {_fmt(low['p95_ms'], '.0f')} / {_fmt(low['p99_ms'], '.0f')} "
            f"| {low['failures'] + sat['failures']} / {low['requests'] + sat['requests']} "
            f"| {_fmt_spread(comparison['throughput_ratio']) if comparison else '1 (reference)'} "
            f"| {_fmt_spread(comparison['p50_latency_ratio']) if comparison else '1 (reference)'} "
            f"| {_fmt(m['direct']['sentences_per_s'])} | {_fmt(m['server_efficiency'], '.2f')} "
            f"| {_fmt(m['bleu'], '.2f')} | {_fmt(m['chrf'], '.2f')} |"
        )
    lines += [
        "",
        "## Without HTTP (every export; the Pareto view)",
        "",
        "| export | method | quantization | parameters | sentences/s | tokens/s | p50 ms (1 sentence) "
        "| BLEU | chrF |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, d in report["direct"].items():
        lines.append(
            f"| {name} | {d['method']} | {d['quantization']} | {d['parameters'] or '-'} "
            f"| {_fmt(d['sentences_per_s'])} | {_fmt(d['tokens_per_s'])} | {_fmt(d['p50_ms'], '.2f')} "
            f"| {_fmt(d['bleu'], '.2f')} | {_fmt(d['chrf'], '.2f')} |"
        )
    pytorch = report["pytorch_teacher"]
    if "skipped" in pytorch:
        lines.append(f"\nPyTorch teacher: {pytorch['skipped']}.")
    else:
        lines.append(f"| teacher (PyTorch checkpoint) | teacher | float32 | - | "
                     f"{_fmt(pytorch['sentences_per_s'])} | {_fmt(pytorch['tokens_per_s'])} | - "
                     f"| {_fmt(pytorch['bleu'], '.2f')} | {_fmt(pytorch['chrf'], '.2f')} |")
        gains = [f"{student} {c['throughput_vs_pytorch_teacher']:.2f}x"
                 for student, c in report["comparisons"].items() if c["throughput_vs_pytorch_teacher"]]
        if gains:
            lines.append(f"\nServed students against the PyTorch teacher (requests/s over sentences/s): "
                         f"{', '.join(gains)}.")
    lines += ["", report["verdict"], "",
              "Definitions: see `definitions` in report.json. Locust's own CSV and HTML reports of every "
              "phase are in `locust/`."]
    if report.get("plots"):
        lines += [""] + [f"![{Path(p).stem}]({p})" for p in report["plots"]]
    return "\n".join(lines) + "\n"


def write_markdown(report: dict[str, Any], path: Path) -> None:
    Path(path).write_text(render_markdown(report), encoding="utf-8")
