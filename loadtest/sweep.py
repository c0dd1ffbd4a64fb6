"""Finding saturation and capacity from a sweep of closed-loop load levels (pure functions).

A sweep runs one model at rising user counts. Closed-loop throughput is users / latency,
so it rises with users until the server is saturated, then stays flat while latency
grows: the sweep stops a model once a level adds less than ``min_gain`` throughput
over its best earlier level. From the levels measured:

- **peak**: the highest request rate of a valid level;
- **capacity at SLO**: the highest request rate of a valid level whose p95 latency is
  within the SLO and whose failures are at most ``max_failure_ratio`` of its requests
  (a measured level, never an interpolation);
- **tail at half capacity**: p99 / p50 at the valid level whose rate is nearest to half
  the capacity, the latency a user sees on a server run at a sensible utilisation.

A level is *valid* when its load generator was not saturated (see ``accounting``).
"""

from __future__ import annotations

from typing import Any

MIN_GAIN = 0.05
MAX_FAILURE_RATIO = 0.01


def throughput_stopped_rising(rates: list[float], min_gain: float = MIN_GAIN) -> bool:
    """True when the newest rate is less than ``(1 + min_gain)`` x the best rate before it."""
    if len(rates) < 2:
        return False
    return rates[-1] < (1 + min_gain) * max(rates[:-1])


def sweep_done(levels: list[dict[str, Any]], min_gain: float = MIN_GAIN) -> str | None:
    """Why a model's sweep stops after ``levels`` (oldest first), or None to go on."""
    if levels and not levels[-1]["valid"]:
        return "load generator saturated"
    if throughput_stopped_rising([level["requests_per_s"] for level in levels], min_gain):
        return "throughput stopped rising"
    return None


def _within_slo(level: dict[str, Any], slo_ms: float, max_failure_ratio: float) -> bool:
    p95 = level["p95_ms"]
    failures_ok = level["failures"] <= max_failure_ratio * max(1, level["requests"])
    return level["valid"] and p95 is not None and p95 <= slo_ms and failures_ok


def peak(levels: list[dict[str, Any]]) -> dict[str, Any] | None:
    valid = [level for level in levels if level["valid"]]
    return max(valid, key=lambda level: level["requests_per_s"]) if valid else None


def capacity_at_slo(levels: list[dict[str, Any]], slo_ms: float,
                    max_failure_ratio: float = MAX_FAILURE_RATIO) -> dict[str, Any] | None:
    """The level that carries the most requests/s within the SLO (None when none does)."""
    within = [level for level in levels if _within_slo(level, slo_ms, max_failure_ratio)]
    return max(within, key=lambda level: level["requests_per_s"]) if within else None


def tail_at_half_capacity(levels: list[dict[str, Any]], capacity_rps: float) -> dict[str, Any] | None:
    """p50, p99 and their ratio at the valid level nearest to half of ``capacity_rps``."""
    candidates = [level for level in levels if level["valid"] and level["p50_ms"] and level["p99_ms"]]
    if not candidates or not capacity_rps:
        return None
    level = min(candidates, key=lambda lv: abs(lv["requests_per_s"] - capacity_rps / 2))
    return {"users": level["users"], "requests_per_s": level["requests_per_s"], "p50_ms": level["p50_ms"],
            "p99_ms": level["p99_ms"], "p99_over_p50": round(level["p99_ms"] / level["p50_ms"], 3)}
