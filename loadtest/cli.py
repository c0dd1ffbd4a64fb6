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


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def configure_bench(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, required=True,
                        help="pipeline run directory (reads data/test.*, export/*, models/teacher)")
    parser.add_argument("--out", type=Path, default=None, help="report directory (default DIR/bench)")
    parser.add_argument("--url", default=None,
                        help="bench a running server at this URL instead of starting one on a free port")
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
    parser.add_argument("--phases", type=_positive_int, default=3,
                        help="rounds per regime; a round is one phase per model, teacher first (default 3)")
    parser.add_argument("--duration", type=_positive_float, default=30.0,
                        help="seconds per phase (default 30; locust counts whole seconds)")
    parser.add_argument("--low-users", type=_positive_int, default=1,
                        help="concurrent users of the latency regime (default 1)")
    parser.add_argument("--users", type=_positive_int, default=16,
                        help="concurrent users of the saturation regime (default 16)")
    parser.add_argument("--spawn-rate", type=_positive_float, default=None,
                        help="users started per second (default: all at once)")
    parser.add_argument("--max-sentences", type=int, default=500,
                        help="first N test sentences (default 500; 0 = all)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads of the direct CTranslate2 and PyTorch runs (default 0: what a "
                             "default `wdserve serve` gives one model, cores // min(models, cores))")
    parser.add_argument("--direct-batch-size", type=_positive_int, default=32,
                        help="batch size of the direct CTranslate2 throughput run (default 32)")
    parser.add_argument("--direct-seconds", type=float, default=3.0,
                        help="repeat each direct CTranslate2 throughput run at least this long (default 3)")
    parser.add_argument("--no-pytorch", dest="pytorch", action="store_false",
                        help="skip the PyTorch teacher baseline")
    parser.add_argument("--server-timeout", type=_positive_float, default=180.0,
                        help="seconds to wait for /ready (default 180)")
    parser.add_argument("--server-arg", dest="server_args", action="append", default=[],
                        help="extra argument for `wdserve serve` "
                             "(repeatable, e.g. --server-arg=--max-batch-size=16)")


def run_bench(args: argparse.Namespace) -> int:
    from loadtest.bench import BenchOptions
    from loadtest.bench import run_bench as bench

    options = BenchOptions(
        workdir=args.workdir, out=args.out, url=args.url, models=args.models, quantization=args.quantization,
        beam_size=args.beam_size, max_length=args.max_length, phases=args.phases, duration=args.duration,
        low_users=args.low_users, users=args.users, spawn_rate=args.spawn_rate,
        max_sentences=args.max_sentences, threads=args.threads, direct_batch_size=args.direct_batch_size,
        direct_seconds=args.direct_seconds, pytorch=args.pytorch, server_timeout=args.server_timeout,
        server_args=args.server_args,
    )
    bench(options)
    return 0
