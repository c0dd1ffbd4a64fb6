"""What shadowing costs the user: a model's p50 latency at half capacity, shadow off against on.

    python tests/server/measure_shadow.py --workdir runs/tiny [--rate 0.05] [--model student]
        [--repeats 3] [--duration 10] [--out DIR]

Issue #19's target: shadowing 5% of the traffic costs the student's p50 latency at most 5% at half
capacity. The bench's machinery throughout (``wdserve.loadtest.bench``): the server and locust on
separate cores, locust phases, the server's CPU seconds. Two servers run side by side on the
server's core, ``--shadow-rate 0`` and ``--shadow-rate RATE`` (the idle one costs nothing). The
off server's sweep finds the peak; half capacity is the user count whose throughput is nearest
half of it. At that level phases then alternate off, on, on, off, ... ``--repeats`` times, and each
pair gives a ratio of p50s (on / off): the median and the range of those ratios are the result.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
from pathlib import Path

from wdserve.artifacts import RunDir
from wdserve.loadtest.accounting import CpuPlan, available_cpus
from wdserve.loadtest.bench import (
    BenchOptions,
    Phase,
    PhaseContext,
    _resolve_exports,
    _warm_up,
    read_test_set,
    run_phase,
    running_server,
)

log = logging.getLogger("measure_shadow")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--rate", type=float, default=0.05)
    parser.add_argument("--model", default="student")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--users", default="1,2,4,8,16,32")
    parser.add_argument("--beam-size", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    out = args.out or Path(tempfile.mkdtemp(prefix="measure_shadow-"))
    locust_dir = out / "locust"
    locust_dir.mkdir(parents=True, exist_ok=True)
    options = BenchOptions(workdir=args.workdir, out=out, duration=args.duration, beam_size=args.beam_size)
    plan = CpuPlan.choose(available_cpus(), None, None)
    sentences, _ = read_test_set(args.workdir, 500)
    sentences_path = out / "sentences.src"
    sentences_path.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    teacher = json.loads(next((args.workdir / "export").glob("teacher-*/model.json")).read_text())
    languages = (teacher["source_lang"], teacher["target_lang"])
    cpus = None if plan.shared else plan.server
    records = []

    with running_server(args.workdir, out / "server-off.log", 180, ["--shadow-rate", "0"], cpus) as off, \
            running_server(args.workdir, out / "server-on.log", 180, ["--shadow-rate", str(args.rate)],
                           cpus, port=0) as on:
        exports = RunDir(args.workdir).exports()
        export = _resolve_exports(off.url, {args.model: args.model}, exports)[args.model]
        contexts = {}
        for name, server in (("off", off), ("on", on)):
            _warm_up(server.url, {args.model: args.model}, languages, options)
            contexts[name] = PhaseContext(server, options, plan, sentences_path, languages, locust_dir)

        def phase(name: str, users: int, round_: int) -> dict:
            record = run_phase(Phase(1, round_, users, f"{args.model}-{name}", args.model, export),
                               contexts[name])
            record["server"] = name
            records.append(record)
            return record

        sweep = [phase("off", users, 0) for users in map(int, args.users.split(","))]
        peak = max(r["requests_per_s"] for r in sweep)
        half = min(sweep, key=lambda r: abs(r["requests_per_s"] - peak / 2))
        log.info("peak %.1f req/s; half capacity: %d users (%.1f req/s)", peak, half["users"],
                 half["requests_per_s"])
        pairs = []
        for repeat in range(args.repeats):
            order = ("off", "on") if repeat % 2 == 0 else ("on", "off")  # neither always goes first
            done = {name: phase(name, half["users"], repeat + 1) for name in order}
            off_phase, on_phase = done["off"], done["on"]
            pairs.append({"off_p50_ms": off_phase["p50_ms"], "on_p50_ms": on_phase["p50_ms"],
                          "off_rps": off_phase["requests_per_s"], "on_rps": on_phase["requests_per_s"],
                          "off_cpu_ms_per_request": off_phase["server_cpu_ms_per_request"],
                          "on_cpu_ms_per_request": on_phase["server_cpu_ms_per_request"],
                          "ratio": on_phase["p50_ms"] / off_phase["p50_ms"]})
            log.info("pair %d: p50 off %.1f ms, on %.1f ms (x%.3f)", repeat, pairs[-1]["off_p50_ms"],
                     pairs[-1]["on_p50_ms"], pairs[-1]["ratio"])
        shadow = [m for m in json.loads(_get(f"{on.url}/models")) if m["name"].startswith(args.model)]

    ratios = [p["ratio"] for p in pairs]
    result = {"model": args.model, "rate": args.rate, "peak_requests_per_s": peak,
              "half_users": half["users"],
              "half_requests_per_s": half["requests_per_s"], "pairs": pairs,
              "p50_ratio": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
              "shadow": [m["shadow"] for m in shadow], "out": str(out)}
    (out / "shadow.json").write_text(json.dumps({**result, "phases": records}, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode("utf-8")


if __name__ == "__main__":
    main(sys.argv[1:])
