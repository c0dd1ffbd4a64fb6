"""``wdserve bench``: load-test the teacher against its students and write OUT/report.{json,md} + plots.

Kept light: nothing heavy is imported until ``run_bench``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of model names")
    return names


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _counts(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _rising(text: str) -> tuple[int, ...]:
    values = _counts(text)
    if list(values) != sorted(set(values)):
        raise argparse.ArgumentTypeError(f"user counts must rise: {text!r}")
    return values


def _thresholds(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or not all(0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated confidences in 0..1, got {text!r}")
    return values


def _cpus(text: str) -> tuple[int, ...]:
    from wdserve.loadtest.accounting import parse_cpus

    try:
        return parse_cpus(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def configure_bench(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, required=True,
                        help="pipeline run directory (reads data/test.*, export/*, models/teacher)")
    parser.add_argument("--out", type=Path, default=None, help="report directory (default DIR/bench)")
    parser.add_argument("--url", default=None,
                        help="bench a running server at this URL instead of starting one on a free port "
                             "(its CPU time is then not accounted)")
    parser.add_argument("--models", type=_names, default=None,
                        help="comma-separated model names, teacher included (default: every exported model)")
    parser.add_argument("--quantization", default=None,
                        help="serve <model>-<quantization> over HTTP (default: the short alias, i.e. the "
                             "server's preferred quantization); direct runs always cover every export")
    parser.add_argument("--beam-size", type=_positive_int, default=4,
                        help="beam size of every request and direct run (default 4, as the pipeline's "
                             "evaluation)")
    parser.add_argument("--max-length", type=_positive_int, default=256,
                        help="max_length of every request and direct run (default 256)")
    parser.add_argument("--users", type=_rising, default=None,
                        help="closed-loop user counts of the sweep, rising (default "
                             "1,2,4,8,16,24,32,48,64,96,128); a model stops once its throughput stops rising")
    parser.add_argument("--min-gain", type=_positive_float, default=0.05,
                        help="a level adding less than this fraction of throughput ends a model's sweep "
                             "(default 0.05)")
    parser.add_argument("--slo-ms", type=_positive_float, default=100.0,
                        help="p95 latency objective of one request; capacity = most requests/s within it "
                             "(default 100)")
    parser.add_argument("--sentences-per-request", type=_counts, default=(1,),
                        help="comma-separated sentences per request, a sweep each (default 1; e.g. 1,8)")
    parser.add_argument("--rounds", type=_positive_int, default=2,
                        help="sweeps per sentences-per-request value; the spread over rounds is reported "
                             "(default 2)")
    parser.add_argument("--duration", type=_positive_float, default=15.0,
                        help="seconds per phase (default 15; locust counts whole seconds)")
    parser.add_argument("--server-cpus", type=_cpus, default=None,
                        help="CPU list of the server, e.g. 0-5 (default: all but the load generator's)")
    parser.add_argument("--load-cpus", type=_cpus, default=None,
                        help="CPU list of locust, e.g. 6,7 (default: the last quarter of the cores, at least "
                             "one); several cores run locust with --processes")
    parser.add_argument("--max-sentences", type=int, default=500,
                        help="first N test sentences (default 500; 0 = all)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads of the direct CTranslate2 and PyTorch runs (default 0: what a "
                             "default `wdserve serve` on the server's cores gives one model)")
    parser.add_argument("--direct-batch-size", type=_positive_int, default=32,
                        help="batch size of the direct run over every export (default 32)")
    parser.add_argument("--direct-seconds", type=float, default=3.0,
                        help="repeat each direct CTranslate2 run at least this long (default 3)")
    parser.add_argument("--no-pytorch", dest="pytorch", action="store_false",
                        help="skip the PyTorch teacher baseline")
    parser.add_argument("--no-cascade", dest="cascade", action="store_false",
                        help="skip the student-first cascade (direct at several thresholds, then served)")
    parser.add_argument("--cascade-student", default=None,
                        help="the cascade's student (default: the first weight-distilled student benched)")
    parser.add_argument("--cascade-thresholds", type=_thresholds, default=None,
                        help="comma-separated confidence thresholds of the cascade (default: the student's "
                             "confidences that send 5, 10, 15, 20, 30, 50%% of the sentences to the teacher)")
    parser.add_argument("--server-timeout", type=_positive_float, default=180.0,
                        help="seconds to wait for /ready (default 180)")
    parser.add_argument("--server-arg", dest="server_args", action="append", default=[],
                        help="extra argument for `wdserve serve` "
                             "(repeatable, e.g. --server-arg=--max-batch-size=16)")
    parser.add_argument("--server-host", default="127.0.0.1",
                        help="address the server the bench starts listens on, and the name locust reaches "
                             "it by: with remote workers, this machine's name or address (default 127.0.0.1)")
    parser.add_argument("--server-port", type=int, default=0,
                        help="port of the server the bench starts (default 0: a free port)")
    parser.add_argument("--locust-workers", type=_non_negative_int, default=0,
                        help="distributed load: each phase's locust is a master that waits for this many "
                             "workers, started anywhere as `locust -f loadtest/locustfile.py --worker "
                             "--master-host THIS_HOST` in a loop (default 0: locust runs here, one process "
                             "per load core)")
    parser.add_argument("--master-port", type=int, default=5557,
                        help="port the locust master listens on for its workers (default 5557)")
    parser.add_argument("--workers-timeout", type=_positive_float, default=120.0,
                        help="seconds a phase's master waits for its workers before the bench fails "
                             "(default 120)")


def run_bench(args: argparse.Namespace) -> None:
    from wdserve.loadtest.bench import DEFAULT_USERS, BenchOptions
    from wdserve.loadtest.bench import run_bench as bench

    options = BenchOptions(
        workdir=args.workdir, out=args.out, url=args.url, models=args.models, quantization=args.quantization,
        beam_size=args.beam_size, max_length=args.max_length, rounds=args.rounds, duration=args.duration,
        users=args.users or DEFAULT_USERS, sentences_per_request=args.sentences_per_request,
        slo_ms=args.slo_ms, min_gain=args.min_gain, server_cpus=args.server_cpus, load_cpus=args.load_cpus,
        max_sentences=args.max_sentences, threads=args.threads, direct_batch_size=args.direct_batch_size,
        direct_seconds=args.direct_seconds, pytorch=args.pytorch, cascade=args.cascade,
        cascade_student=args.cascade_student, cascade_thresholds=args.cascade_thresholds,
        server_timeout=args.server_timeout,
        server_args=args.server_args, server_host=args.server_host, server_port=args.server_port,
        locust_workers=args.locust_workers, master_port=args.master_port,
        workers_timeout=args.workers_timeout,
    )
    bench(options)
