"""PNG plots of a bench report (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(names: list[str]) -> dict[str, Any]:
    cycle = _pyplot().rcParams["axes.prop_cycle"].by_key()["color"]
    return {name: cycle[i % len(cycle)] for i, name in enumerate(names)}


def plot_latency(report: dict[str, Any], path: Path) -> None:
    """Latency CDF per model from locust's percentile columns, one line per phase, both regimes."""
    plt = _pyplot()
    colors = _colors(list(report["models"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, regime in zip(axes, ("low", "saturation"), strict=True):
        labelled = set()
        for phase in (p for p in report["phases"] if p["regime"] == regime):
            points = sorted((ms, float(q.rstrip("%"))) for q, ms in phase["percentiles_ms"].items()
                            if ms is not None)
            if not points:
                continue
            label = None if phase["model"] in labelled else phase["model"]
            labelled.add(phase["model"])
            ax.plot([ms for ms, _ in points], [q for _, q in points], marker=".", alpha=0.8,
                    color=colors[phase["model"]], label=label)
        users = report["settings"]["low_users" if regime == "low" else "users"]
        ax.set_title(f"{regime} ({users} user{'s' if users > 1 else ''})")
        ax.set_xlabel("latency (ms)")
        ax.grid(alpha=0.3)
        if labelled:
            ax.legend()
    axes[0].set_ylabel("percentile of requests")
    fig.suptitle("Latency distribution per model (one line per phase)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_throughput(report: dict[str, Any], path: Path) -> None:
    """Saturation requests/s and tokens/s per model: median bar, min-max over phases as error bar."""
    plt = _pyplot()
    models = list(report["models"])
    colors = _colors(models)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = (("requests_per_s", "requests/s"), ("tokens_per_s", "tokens/s"))
    for ax, (key, label) in zip(axes, panels, strict=True):
        medians, low_err, high_err = [], [], []
        for model in models:
            values = [p[key] for p in report["phases"] if p["model"] == model and p["regime"] == "saturation"]
            median = report["models"][model]["http"]["saturation"][key] or 0.0
            medians.append(median)
            # the summary median is rounded: clamp so that rounding never yields a negative whisker
            low_err.append(max(0.0, median - min(values, default=median)))
            high_err.append(max(0.0, max(values, default=median) - median))
        ax.bar(models, medians, yerr=[low_err, high_err], capsize=6, color=[colors[m] for m in models])
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Throughput at saturation ({report['settings']['users']} users; bar: median, "
                 "whiskers: min-max over phases)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Names of (name, speed, quality) points that no other point beats on both axes."""
    front = []
    for name, speed, quality in points:
        dominated = any(s >= speed and q >= quality and (s, q) != (speed, quality) for _, s, q in points)
        if not dominated:
            front.append(name)
    return front


def plot_pareto(report: dict[str, Any], path: Path) -> None:
    """BLEU against direct CTranslate2 sentences/s for every export (and the PyTorch teacher)."""
    plt = _pyplot()
    points = [(name, d["sentences_per_s"], d["bleu"]) for name, d in report["direct"].items()]
    family = {name: d["name"] for name, d in report["direct"].items()}  # teacher-int8 -> teacher
    pytorch = report["pytorch_teacher"]
    if "skipped" not in pytorch:
        points.append(("teacher (PyTorch)", pytorch["sentences_per_s"], pytorch["bleu"]))
        family["teacher (PyTorch)"] = "teacher"
    colors = _colors(sorted(set(family.values()), key=lambda n: (n != "teacher", n)))
    front = set(pareto_front(points))
    markers = {"int8": "s", "float32": "o"}
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for name, speed, bleu in points:
        quantization = report["direct"].get(name, {}).get("quantization")
        ax.scatter(speed, bleu, s=70, marker=markers.get(quantization, "^"), color=colors[family[name]],
                   edgecolors="black" if name in front else "none")
        ax.annotate(name, (speed, bleu), textcoords="offset points", xytext=(6, 4), fontsize=8)
    frontier = sorted((speed, bleu) for name, speed, bleu in points if name in front)
    ax.plot([s for s, _ in frontier], [b for _, b in frontier], linestyle="--", color="grey", linewidth=1,
            label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("direct CTranslate2 sentences/s (log scale)")
    ax.set_ylabel("BLEU")
    ax.set_title("Quality against speed (square: int8, circle: float32, triangle: PyTorch;\n"
                 "outlined: on the Pareto front)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(report: dict[str, Any], out: Path) -> list[str]:
    """Writes the three PNGs into ``out`` and returns their names."""
    plots = {"latency.png": plot_latency, "throughput.png": plot_throughput, "pareto.png": plot_pareto}
    for name, plot in plots.items():
        plot(report, Path(out) / name)
    return list(plots)
