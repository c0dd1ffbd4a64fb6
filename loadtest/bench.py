"""``wdserve bench``: teacher against students, over HTTP and without it, in one unattended run.

Order of work, so that nothing measured competes with anything else for the CPU:

1. without HTTP: direct CTranslate2 over the same sentences for every export
   directory (throughput, one-sentence latency, BLEU, chrF), then the PyTorch teacher;
2. a server on a free local port (or ``--url``), readiness polled on /ready;
3. locust, headless, one subprocess per phase (gevent never patches this process),
   phases alternating teacher, student, ..., teacher, student, ... with the same
   sentences, beam size, length limit and user count, first at a low fixed
   concurrency (latency), then at saturation (throughput);
4. OUT/report.json, OUT/report.md and PNG plots beside locust's CSV and HTML.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from loadtest.baselines import ExportInfo, discover_exports, measure_direct, measure_pytorch_teacher
from server.settings import ServeSettings

log = logging.getLogger("wdserve.bench")

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
REGIMES = ("low", "saturation")
SERVE_COMMAND = [sys.executable, "-m", "wdserve.cli", "serve"]  # `wdserve serve` of this interpreter


@dataclass
class BenchOptions:
    workdir: Path
    out: Path | None = None
    url: str | None = None
    models: list[str] | None = None  # default: teacher + every student exported
    quantization: str | None = None  # default: the server's preferred one (the short alias)
    beam_size: int = 4
    max_length: int = 256
    phases: int = 3  # rounds of (teacher, student, ...) per regime
    duration: float = 30.0  # seconds per phase
    low_users: int = 1
    users: int = 16
    spawn_rate: float | None = None  # default: every user at once
    max_sentences: int = 500
    threads: int = 0  # direct CTranslate2 / PyTorch threads (0: what the server gives one model)
    direct_batch_size: int = 32
    direct_seconds: float = 3.0  # repeat each direct batched run at least this long
    pytorch: bool = True
    server_timeout: float = 180.0
    server_args: list[str] = field(default_factory=list)

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path(self.workdir) / "bench"


# ---------------------------------------------------------------------------------------------------
# Inputs


def read_test_set(workdir: Path, limit: int) -> tuple[list[str], list[str]]:
    src, tgt = Path(workdir) / "data" / "test.src", Path(workdir) / "data" / "test.tgt"
    for path in (src, tgt):
        if not path.is_file():
            raise SystemExit(f"test set file not found: {path} (run `wdserve pipeline` on {workdir} first)")
    sources = src.read_text(encoding="utf-8").splitlines()
    references = tgt.read_text(encoding="utf-8").splitlines()
    if len(sources) != len(references):
        raise SystemExit(f"{src} has {len(sources)} lines but {tgt} has {len(references)}")
    pairs = [(s.strip(), r.strip()) for s, r in zip(sources, references, strict=True) if s.strip()]
    if not pairs:
        raise SystemExit(f"{src} has no sentences")
    pairs = pairs[:limit] if limit > 0 else pairs
    return [s for s, _ in pairs], [r for _, r in pairs]


def server_threads_per_model(n_models: int, cores: int | None = None) -> int:
    """Threads one translate call gets from a default ``wdserve serve`` of ``n_models`` models.

    Direct runs use the same, so that HTTP and direct numbers share the same compute per model;
    the rule itself lives with the server (``ServeSettings.thread_plan``).
    """
    return ServeSettings().thread_plan(n_models, cores)[1]


def choose_models(exports: list[ExportInfo], requested: list[str] | None) -> list[str]:
    """Model names to load-test, teacher first: ``requested`` or every exported name."""
    available = sorted({e.name for e in exports}, key=lambda n: (n != "teacher", n))
    names = requested or available
    unknown = [n for n in names if n not in available]
    if unknown:
        raise SystemExit(f"--models {','.join(unknown)}: not exported (available: {', '.join(available)})")
    if "teacher" not in names:
        raise SystemExit("--models must include teacher: every student is measured against it")
    if len(names) < 2:
        raise SystemExit(f"nothing to compare the teacher with (exported models: {', '.join(available)})")
    return ["teacher"] + [n for n in names if n != "teacher"]


def served_export(listing: Any, served_name: str, export_dirs: list[str]) -> str | None:
    """The export directory the server answers ``served_name`` with, read from GET /models."""
    if served_name in export_dirs:
        return served_name
    entries = listing.get("models", listing) if isinstance(listing, dict) else listing
    if isinstance(entries, dict):
        entries = [{"name": name, **info} for name, info in entries.items() if isinstance(info, dict)]
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and served_name in (entry.get("aliases") or []):
            for key in ("name", "export", "directory", "path"):
                value = entry.get(key)
                if isinstance(value, str) and Path(value).name in export_dirs:
                    return Path(value).name
    return None


# ---------------------------------------------------------------------------------------------------
# The server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read().decode("utf-8"))


def http_post_json(url: str, payload: dict[str, Any], timeout: float = 120.0) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode("utf-8"), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read().decode("utf-8"))


def wait_ready(url: str, timeout: float, process: subprocess.Popen | None = None, log_path: Path | None = None
               ) -> None:
    deadline = time.monotonic() + timeout
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:] if log_path else ""
            raise SystemExit(f"the server exited with code {process.returncode} before it was ready; "
                             f"its log ({log_path}) ends:\n{tail}")
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=5) as response:
                if response.status == 200:
                    return
                last_error = f"HTTP {response.status}"
        except urllib.error.HTTPError as err:
            last_error = f"HTTP {err.code}"
        except OSError as err:
            last_error = str(err)
        time.sleep(0.3)
    raise SystemExit(f"{url}/ready did not answer 200 within {timeout:.0f}s (last: {last_error})")


@contextmanager
def running_server(workdir: Path, log_path: Path, timeout: float, extra_args: list[str]) -> Iterator[str]:
    """``wdserve serve`` on a free local port, yielding its URL; SIGTERM (then SIGKILL) on the way out."""
    port = free_port()
    command = [*SERVE_COMMAND, "--workdir", str(workdir), "--host", "127.0.0.1", "--port", str(port),
               *extra_args]
    log.info("starting server: %s", " ".join(command))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as server_log:
        process = subprocess.Popen(command, stdout=server_log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout, process, log_path)
        log.info("server ready at %s (pid %d)", url, process.pid)
        yield url
    finally:
        stop_process(process)


def stop_process(process: subprocess.Popen, grace: float = 15.0) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        log.warning("process %d ignored SIGTERM for %.0fs; killing it", process.pid, grace)
        process.kill()
        process.wait()


# ---------------------------------------------------------------------------------------------------
# Locust


def _number(value: str) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None  # locust writes "N/A" for percentiles of a name without requests


def read_locust_stats(csv_path: Path, name: str) -> dict[str, Any]:
    """The row of request ``name`` in a locust ``*_stats.csv`` (zeros if locust filed no request)."""
    with open(csv_path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row["Name"] == name:
                return {
                    "requests": int(row["Request Count"]),
                    "failures": int(row["Failure Count"]),
                    "requests_per_s": _number(row["Requests/s"]) or 0.0,
                    "failures_per_s": _number(row["Failures/s"]) or 0.0,
                    "avg_ms": _number(row["Average Response Time"]),
                    "min_ms": _number(row["Min Response Time"]),
                    "max_ms": _number(row["Max Response Time"]),
                    "percentiles_ms": {key: _number(row[key]) for key in row if key.endswith("%")},
                    "p50_ms": _number(row["50%"]),
                    "p95_ms": _number(row["95%"]),
                    "p99_ms": _number(row["99%"]),
                }
    return {"requests": 0, "failures": 0, "requests_per_s": 0.0, "failures_per_s": 0.0, "avg_ms": None,
            "min_ms": None, "max_ms": None, "percentiles_ms": {}, "p50_ms": None, "p95_ms": None,
            "p99_ms": None}


def read_locust_failures(csv_path: Path, name: str) -> list[str]:
    if not csv_path.is_file():
        return []
    with open(csv_path, newline="", encoding="utf-8") as handle:
        rows = csv.DictReader(handle)
        return [f"{row['Occurrences']}x {row['Error']}" for row in rows if row["Name"] == name]


def request_name(served_name: str) -> str:
    """The name the locustfile files requests under (its ``request_name``; not imported, since
    importing locust here would let gevent monkey-patch the bench process)."""
    return f"/translate {served_name}"


@dataclass
class Phase:
    regime: str
    round: int
    model: str  # the model name (teacher, student, ...)
    served_as: str  # what the requests asked for: an alias or an export directory name
    users: int


def run_phase(phase: Phase, url: str, options: BenchOptions, sentences_path: Path, languages: tuple[str, str],
              locust_dir: Path) -> dict[str, Any]:
    """One headless locust run against one model; its numbers, read back from locust's own CSV."""
    prefix = locust_dir / f"{phase.regime}-{phase.round:02d}-{phase.model}"
    duration = max(1, round(options.duration))
    spawn_rate = options.spawn_rate or phase.users
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url,
        "--users", str(phase.users), "--spawn-rate", str(spawn_rate), "--run-time", f"{duration}s",
        "--csv", str(prefix), "--html", f"{prefix}.html", "--only-summary",
        "--exit-code-on-error", "0", "--loglevel", "WARNING",
    ]
    env = {
        **os.environ,
        "WDSERVE_SENTENCES": str(sentences_path),
        "WDSERVE_LOAD_MODELS": phase.served_as,
        "WDSERVE_LOAD_SOURCE": languages[0],
        "WDSERVE_LOAD_TARGET": languages[1],
        "WDSERVE_LOAD_BEAM_SIZE": str(options.beam_size),
        "WDSERVE_LOAD_MAX_LENGTH": str(options.max_length),
        "WDSERVE_LOAD_BATCH": "1",
    }
    log.info("phase %s round %d: %s (%s), %d users, %ds", phase.regime, phase.round, phase.model,
             phase.served_as, phase.users, duration)
    with open(f"{prefix}.log", "w", encoding="utf-8") as locust_log:
        try:
            finished = subprocess.run(command, env=env, stdout=locust_log, stderr=subprocess.STDOUT,
                                      timeout=duration + 120)
        except subprocess.TimeoutExpired as err:
            raise SystemExit(f"locust did not finish within {duration + 120}s; see {prefix}.log") from err
    stats_path = Path(f"{prefix}_stats.csv")
    if finished.returncode != 0 or not stats_path.is_file():
        tail = Path(f"{prefix}.log").read_text(encoding="utf-8", errors="replace")[-3000:]
        raise SystemExit(f"locust failed (exit code {finished.returncode}); {prefix}.log ends:\n{tail}")
    name = request_name(phase.served_as)
    stats = read_locust_stats(stats_path, name)
    tokens_path = Path(f"{prefix}_tokens.json")
    counted = json.loads(tokens_path.read_text()).get(phase.served_as, {}) if tokens_path.is_file() else {}
    tokens = counted.get("tokens", 0)
    # tokens per request filed by locust (failures included, they produce none) times locust's own rate
    tokens_per_s = stats["requests_per_s"] * tokens / stats["requests"] if stats["requests"] else 0.0
    record = {
        **asdict(phase),
        "request_name": name,
        "duration_s": duration,
        **stats,
        "tokens": tokens,
        "tokens_per_s": round(tokens_per_s, 3),
        "errors": read_locust_failures(Path(f"{prefix}_failures.csv"), name),
        "files": {"stats_csv": stats_path.name, "html": Path(f"{prefix}.html").name},
    }
    log.info("phase %s round %d: %s done: %d requests, %d failures, %.2f req/s, %.1f tokens/s, "
             "p50 %s ms, p95 %s ms, p99 %s ms", phase.regime, phase.round, phase.model, record["requests"],
             record["failures"], record["requests_per_s"], record["tokens_per_s"], record["p50_ms"],
             record["p95_ms"], record["p99_ms"])
    return record


def schedule(models: list[str], served: dict[str, str], options: BenchOptions) -> list[Phase]:
    """Low-concurrency rounds, then saturation rounds; each round is teacher, student, ..."""
    users = {"low": options.low_users, "saturation": options.users}
    return [Phase(regime, r, m, served[m], users[regime])
            for regime in REGIMES for r in range(options.phases) for m in models]


# ---------------------------------------------------------------------------------------------------
# The whole run


def run_bench(options: BenchOptions) -> dict[str, Any]:
    """Measures, writes OUT/report.json, OUT/report.md and plots, and returns the report.

    SIGTERM (``docker stop``, a CI timeout) unwinds like Ctrl-C: the locust run and the
    server started here are stopped on the way out, never left running.
    """
    with _sigterm_unwinds():
        return _run_bench(options)


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    def unwind(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, unwind)
    except ValueError:  # not the main thread: leave signals to whoever owns them
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_bench(options: BenchOptions) -> dict[str, Any]:
    from loadtest.plots import write_plots
    from loadtest.report import build_report, write_markdown

    workdir = Path(options.workdir)
    out = options.out_dir
    locust_dir = out / "locust"
    locust_dir.mkdir(parents=True, exist_ok=True)
    for stale in locust_dir.glob("*"):  # phases of an earlier run would be mistaken for this one's
        if stale.is_file() and stale.name.startswith(REGIMES):
            stale.unlink()

    exports = discover_exports(workdir)
    models = choose_models(exports, options.models)
    options = replace(options, threads=options.threads or server_threads_per_model(len(exports)))
    sentences, references = read_test_set(workdir, options.max_sentences)
    sentences_path = out / "sentences.src"
    sentences_path.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    teacher_export = next(e for e in exports if e.name == "teacher")
    languages = (teacher_export.source_lang, teacher_export.target_lang)
    log.info("bench: %s against %s, %d sentences, beam %d, max length %d, %d thread(s) per direct run",
             models[0], ", ".join(models[1:]), len(sentences), options.beam_size, options.max_length,
             options.threads)

    direct = {}
    for export in exports:
        direct[export.dir_name] = measure_direct(
            export, sentences, references, options.beam_size, options.max_length,
            batch_size=options.direct_batch_size, threads=options.threads,
            min_seconds=options.direct_seconds,
        )
        d = direct[export.dir_name]
        log.info("direct CTranslate2 %s: %.1f sentences/s, %.1f tokens/s, p50 %.1f ms, BLEU %.2f, chrF %.2f",
                 export.dir_name, d["sentences_per_s"], d["tokens_per_s"], d["p50_ms"], d["bleu"], d["chrf"])
    if options.pytorch:
        pytorch = measure_pytorch_teacher(workdir / "models" / "teacher" / "checkpoint_best.pt", sentences,
                                          references, options.beam_size, threads=options.threads)
        if "skipped" not in pytorch:
            log.info("PyTorch teacher: %.1f sentences/s, BLEU %.2f, chrF %.2f", pytorch["sentences_per_s"],
                     pytorch["bleu"], pytorch["chrf"])
    else:
        pytorch = {"skipped": "PyTorch baseline not requested (--no-pytorch)"}

    with _server(options, out) as url:
        served_names = {m: f"{m}-{options.quantization}" if options.quantization else m for m in models}
        served = _resolve_exports(url, served_names, exports)
        _warm_up(url, served_names, languages, options)
        phases = [run_phase(phase, url, options, sentences_path, languages, locust_dir)
                  for phase in schedule(models, served_names, options)]

    report = build_report(options, models, served, exports, direct, pytorch, phases, url)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    report["plots"] = write_plots(report, out)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    write_markdown(report, out / "report.md")
    log.info("%s", report["verdict"])
    log.info("report written to %s (report.json, report.md, %s)", out, ", ".join(report["plots"]))
    return report


@contextmanager
def _server(options: BenchOptions, out: Path) -> Iterator[str]:
    if options.url:
        url = options.url.rstrip("/")
        wait_ready(url, options.server_timeout)
        yield url
    else:
        with running_server(Path(options.workdir), out / "server.log", options.server_timeout,
                            options.server_args) as url:
            yield url


def _resolve_exports(url: str, served_names: dict[str, str], exports: list[ExportInfo]) -> dict[str, str]:
    """model name -> export directory that answers it, as the server reports it."""
    try:
        listing = http_get_json(f"{url}/models")
    except (OSError, ValueError) as err:
        raise SystemExit(f"cannot read {url}/models: {err}") from err
    dirs = [e.dir_name for e in exports]
    resolved = {}
    for model, served_name in served_names.items():
        found = served_export(listing, served_name, dirs)
        if found is None:
            raise SystemExit(f"the server at {url} does not list {served_name!r} in /models "
                             f"(local exports: {', '.join(dirs)}); is it serving {served_name}?")
        resolved[model] = found
        log.info("%s is served by export %s", served_name, found)
    return resolved


def _warm_up(
    url: str, served_names: dict[str, str], languages: tuple[str, str], options: BenchOptions
) -> None:
    """One request per model before any phase, so lazy loading never lands in a measurement."""
    for served_name in served_names.values():
        payload = {"q": "warm up", "source": languages[0], "target": languages[1], "format": "text",
                   "model": served_name, "beam_size": options.beam_size, "max_length": options.max_length}
        try:
            http_post_json(f"{url}/translate", payload)
        except urllib.error.HTTPError as err:
            body = err.read().decode("utf-8", errors="replace")[:300]
            raise SystemExit(
                f"POST {url}/translate for {served_name!r} failed: HTTP {err.code} {body}"
            ) from err
