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


def plot_curves(report: dict[str, Any], path: Path) -> None:
    """Throughput against p95 latency, one line per model, one panel per sentences-per-request value;
    each point a user count (median over rounds), the SLO a dashed line."""
    plt = _pyplot()
    models = list(report["models"])
    colors = _colors(models)
    keys = [str(k) for k in report["settings"]["sentences_per_request"]]
    fig, axes = plt.subplots(1, len(keys), figsize=(6.5 * len(keys), 4.6), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for model in models:
            points = [pt for pt in report["models"][model]["by_sentences_per_request"][key]["curve"]
                      if pt["requests_per_s"] is not None and pt["p95_ms"] is not None]
            ax.plot([pt["requests_per_s"] for pt in points], [pt["p95_ms"] for pt in points], marker="o",
                    color=colors[model], label=model)
            for pt in points:
                ax.annotate(str(pt["users"]), (pt["requests_per_s"], pt["p95_ms"]),
                            textcoords="offset points", xytext=(3, 3), fontsize=7, color=colors[model])
        ax.axhline(report["settings"]["slo_ms"], linestyle="--", color="grey", linewidth=1, label="SLO (p95)")
        ax.set_yscale("log")
        ax.set_xlabel("requests/s")
        ax.set_ylabel("p95 latency (ms, log scale)")
        ax.set_title(f"{key} sentence(s) per request (labels: users)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Throughput against latency as load rises, server on its own cores")
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
    cascade = report.get("cascade")
    if cascade:  # a line of its own from the student towards the teacher, one point per threshold
        steps = [(p["sentences_per_s"], p["bleu"], p["fallback_share"]) for p in cascade["points"]]
        ax.plot([s for s, _, _ in steps], [b for _, b, _ in steps], marker="D", color="black", linewidth=1,
                markersize=5, label=f"cascade {cascade['model']} -> teacher")
        for speed, bleu, share in steps:
            ax.annotate(f"{100 * share:.0f}%", (speed, bleu), textcoords="offset points", xytext=(4, -10),
                        fontsize=7)
    frontier = sorted((speed, bleu) for name, speed, bleu in points if name in front)
    ax.plot([s for s, _ in frontier], [b for _, b in frontier], linestyle="--", color="grey", linewidth=1,
            label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("direct CTranslate2 sentences/s (log scale)")
    ax.set_ylabel("BLEU")
    ax.set_title("Quality against speed (square: int8, circle: float32, triangle: PyTorch;\n"
                 "outlined: on the Pareto front; diamonds: cascade, % of sentences to the teacher)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(report: dict[str, Any], out: Path) -> list[str]:
    """Writes the PNGs into ``out`` and returns their names."""
    plots = {"curves.png": plot_curves, "pareto.png": plot_pareto}
    for name, plot in plots.items():
        plot(report, Path(out) / name)
    return list(plots)
