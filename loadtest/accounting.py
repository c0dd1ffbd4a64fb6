"""Where the bench's processes run and what CPU they spend.

A load generator on the same cores as the server measures itself, so the bench gives
the server and locust disjoint CPU sets (``CpuPlan``), reads the server's own CPU
seconds per phase from the kernel (psutil), reads locust's from the locustfile's
client stats, and reads the server's batch sizes from its Prometheus ``/metrics``.
"""

from __future__ import annotations

import contextlib
import json
import os
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from wdserve.errors import WdserveError

LOAD_SATURATED = 0.9  # a load generator busier than this fraction of its cores may be the bottleneck


class BenchError(WdserveError, RuntimeError):
    """The bench cannot run as asked; the message says why and what to change."""


def parse_cpus(text: str) -> tuple[int, ...]:
    """``"0-2,5"`` -> ``(0, 1, 2, 5)``, as ``taskset -c`` reads a CPU list."""
    cpus: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        first, _, last = part.partition("-")
        try:
            low, high = int(first), int(last or first)
        except ValueError:
            raise ValueError(f"not a CPU list: {text!r} (expected e.g. 0-2,5)") from None
        if low > high or low < 0:
            raise ValueError(f"not a CPU range: {part!r}")
        cpus.update(range(low, high + 1))
    if not cpus:
        raise ValueError(f"empty CPU list: {text!r}")
    return tuple(sorted(cpus))


def format_cpus(cpus: tuple[int, ...]) -> str:
    return ",".join(map(str, cpus))


@dataclass(frozen=True)
class CpuPlan:
    """The server's and the load generator's cores; ``shared`` when they could not be kept apart."""

    server: tuple[int, ...]
    load: tuple[int, ...]

    @property
    def shared(self) -> bool:
        return bool(set(self.server) & set(self.load))

    @classmethod
    def choose(cls, available: tuple[int, ...], server: tuple[int, ...] | None = None,
               load: tuple[int, ...] | None = None) -> CpuPlan:
        """Explicit sets are kept (checked against ``available``); otherwise the load generator gets a
        quarter of the cores (at least one, the last ones) and the server the rest. One core is shared."""
        for name, cpus in (("--server-cpus", server), ("--load-cpus", load)):
            missing = sorted(set(cpus or ()) - set(available))
            if missing:
                raise BenchError(f"{name}: CPU(s) {format_cpus(tuple(missing))} are not available to this "
                                 f"process (available: {format_cpus(available)})")
        if len(available) < 2:
            return cls(server or available, load or available)
        if server is None and load is None:
            n_load = max(1, len(available) // 4)
            return cls(available[:-n_load], available[-n_load:])
        if server is None:
            server = tuple(c for c in available if c not in load) or available
        if load is None:
            load = tuple(c for c in available if c not in server) or available
        return cls(server, load)

    def describe(self) -> dict[str, Any]:
        return {"server": list(self.server), "load": list(self.load), "shared": self.shared}


def available_cpus() -> tuple[int, ...]:
    return tuple(sorted(os.sched_getaffinity(0)))


def pin_process(pid: int, cpus: tuple[int, ...]) -> None:
    """Pins every thread of ``pid`` (threads it starts later inherit the mask)."""
    for thread in psutil.Process(pid).threads():
        with contextlib.suppress(ProcessLookupError):  # the thread ended meanwhile
            os.sched_setaffinity(thread.id, cpus)


@contextmanager
def pinned(cpus: tuple[int, ...]) -> Iterator[None]:
    """This process, all its threads, on ``cpus`` for the block (direct runs on the server's cores)."""
    before = tuple(sorted(os.sched_getaffinity(0)))
    pin_process(os.getpid(), cpus)
    try:
        yield
    finally:
        pin_process(os.getpid(), before)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far, all its threads."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def read_client_stats(prefix: Path) -> dict[str, Any]:
    """The locustfile's ``PREFIX.<pid>.json`` files of one run, summed over locust's processes."""
    files = sorted(Path(prefix).parent.glob(f"{Path(prefix).name}.*.json"))
    if not files:
        raise BenchError(f"locust wrote no client stats ({prefix}.<process>.json); "
                         "is the locustfile current?")
    total: dict[str, Any] = {"processes": len(files), "cpu_s": 0.0, "wall_s": 0.0, "busiest": 0.0,
                             "models": {}}
    for path in files:
        stats = json.loads(path.read_text(encoding="utf-8"))
        total["cpu_s"] += stats["cpu_s"]
        total["wall_s"] = max(total["wall_s"], stats["wall_s"])
        total["busiest"] = max(total["busiest"], utilization(stats["cpu_s"], stats["wall_s"], 1) or 0.0)
        for model, counts in stats["models"].items():
            into = total["models"].setdefault(model, dict.fromkeys(counts, 0))
            for key, value in counts.items():
                into[key] += value
    return total


def utilization(cpu_s: float, wall_s: float, cores: int) -> float | None:
    """Fraction of ``cores`` busy over ``wall_s`` seconds."""
    return cpu_s / (wall_s * cores) if wall_s > 0 and cores > 0 else None


def load_busy(client: dict[str, Any], load_cores: int, distributed: bool) -> float | None:
    """How busy the load generator was, from ``read_client_stats``: on this machine, its processes'
    CPU over its cores; distributed, its busiest process's share of one core (a locust process runs on
    one core, and the bench cannot know the workers' machines)."""
    if distributed:
        return client["busiest"] if client["wall_s"] > 0 else None
    return utilization(client["cpu_s"], client["wall_s"], load_cores)


def scrape_metrics(url: str, timeout: float = 10.0) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics parsed by prometheus_client: ``{(sample name, sorted labels): value}``."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=timeout) as response:
        text = response.read().decode("utf-8")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def batches_between(before: dict, after: dict, model: str) -> tuple[float, float]:
    """(translate_batch calls, sentences in them) of ``model`` between two scrapes."""
    labels = (("model", model),)

    def delta(name: str) -> float:
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    return delta("wdserve_batch_size_count"), delta("wdserve_batch_size_sum")
