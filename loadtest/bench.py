"""``wdserve bench``: each model's capacity as the *service* delivers it, teacher against students.

Order of work, so that nothing measured competes with anything else for the CPU:

1. the cores are split (``accounting.CpuPlan``): the server's set and the load
   generator's set are disjoint whenever there are two cores or more;
2. without HTTP, on the server's cores with the server's threads: direct CTranslate2
   over the same sentences for every export (throughput, one-sentence latency, BLEU,
   chrF), then the PyTorch teacher;
3. ``wdserve serve`` on a free local port, pinned to its cores (or ``--url``);
4. for each sentences-per-request value and each round, a sweep of closed-loop user
   counts: at every level one locust phase per model, teacher first, so that drift hits
   every model alike; a model leaves the sweep once its throughput stops rising
   (``sweep``). Per phase: locust's own CSV, the server's CPU seconds (psutil), its
   batch sizes (``/metrics``) and the load generator's CPU seconds;
5. direct CTranslate2 again, at each model's own mean batch size in the server, to
   price the service's overhead per request;
6. the student-first cascade (``loadtest.cascade``): direct at several confidence thresholds in
   step 2, and the same thresholds through the served cascade after the sweep;
7. OUT/report.json, OUT/report.md and plots beside locust's CSV and HTML.
"""

from __future__ import annotations

import csv
import json
import logging
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wdserve.artifacts import ArtifactError, ExportDir, RunDir
from wdserve.loadtest.accounting import (
    LOAD_SATURATED,
    BenchError,
    CpuPlan,
    available_cpus,
    batches_between,
    format_cpus,
    load_busy,
    pin_process,
    pinned,
    process_cpu_seconds,
    read_client_stats,
    scrape_metrics,
    utilization,
)
from wdserve.loadtest.baselines import (
    measure_direct,
    measure_direct_cpu,
    measure_pytorch_teacher,
)
from wdserve.loadtest.cascade import (
    CASCADE_NAME,
    measure_direct_cascade,
    served_cascade_quality,
    summarize,
)
from wdserve.loadtest.report import (
    build_report,
    equal_terms_key,
    peak_phase,
    rounded,
    server_batch_size,
    write_markdown,
)
from wdserve.loadtest.sweep import MIN_GAIN, sweep_done
from wdserve.server.settings import ServeSettings

log = logging.getLogger("wdserve.bench")

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
SERVE_COMMAND = [sys.executable, "-m", "wdserve.cli", "serve"]  # `wdserve serve` of this interpreter
DEFAULT_USERS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)  # 1.5x steps near saturation


@dataclass
class BenchOptions:
    workdir: Path
    out: Path | None = None
    url: str | None = None
    models: list[str] | None = None  # default: teacher + every student exported
    quantization: str | None = None  # default: the server's preferred one (the short alias)
    beam_size: int = 4
    max_length: int = 256
    rounds: int = 2  # sweeps per sentences-per-request value, each alternating the models
    duration: float = 15.0  # seconds per phase
    users: tuple[int, ...] = DEFAULT_USERS  # closed-loop levels of the sweep, rising
    sentences_per_request: tuple[int, ...] = (1,)
    slo_ms: float = 100.0  # p95 latency objective of one request, for capacity at SLO
    min_gain: float = MIN_GAIN  # a level adding less throughput than this ends a model's sweep
    server_cpus: tuple[int, ...] | None = None  # default: CpuPlan.choose
    load_cpus: tuple[int, ...] | None = None
    max_sentences: int = 500
    threads: int = 0  # direct CTranslate2 / PyTorch threads (0: what the server gives one model)
    direct_batch_size: int = 32
    direct_seconds: float = 3.0  # repeat each direct batched run at least this long
    pytorch: bool = True
    cascade: bool = True  # measure the student-first cascade (loadtest.cascade)
    cascade_student: str | None = None  # default: the first weight-distilled student, else the first one
    cascade_thresholds: tuple[float, ...] | None = None  # default: loadtest.cascade.auto_thresholds
    server_timeout: float = 180.0
    server_args: list[str] = field(default_factory=list)
    server_host: str = "127.0.0.1"  # where the server the bench starts listens, and the name locust uses
    server_port: int = 0  # 0: a free port
    locust_workers: int = 0  # > 0: each phase's locust is a master waiting for this many --worker processes
    master_port: int = 5557
    workers_timeout: float = 120.0  # how long a phase's master waits for its workers

    @property
    def distributed(self) -> bool:
        return self.locust_workers > 0

    @property
    def phase_seconds(self) -> int:
        """Seconds per phase as locust runs them (whole seconds, at least one)."""
        return max(1, round(self.duration))

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else RunDir(self.workdir).bench


# ---------------------------------------------------------------------------------------------------
# Inputs


def read_test_set(workdir: Path, limit: int) -> tuple[list[str], list[str]]:
    src, tgt = RunDir(workdir).data("test", "src"), RunDir(workdir).data("test", "tgt")
    for path in (src, tgt):
        if not path.is_file():
            raise BenchError(f"test set file not found: {path} (run `wdserve pipeline` on {workdir} first)")
    sources = src.read_text(encoding="utf-8").splitlines()
    references = tgt.read_text(encoding="utf-8").splitlines()
    if len(sources) != len(references):
        raise BenchError(f"{src} has {len(sources)} lines but {tgt} has {len(references)}")
    pairs = [(s.strip(), r.strip()) for s, r in zip(sources, references, strict=True) if s.strip()]
    if not pairs:
        raise BenchError(f"{src} has no sentences")
    pairs = pairs[:limit] if limit > 0 else pairs
    return [s for s, _ in pairs], [r for _, r in pairs]


def server_threads_per_model(n_models: int, cores: int | None = None) -> int:
    """Threads one translate call gets from a default ``wdserve serve`` of ``n_models`` models on ``cores``.

    Direct runs use the same, so that HTTP and direct numbers share the same compute per model;
    the rule itself lives with the server (``ServeSettings.thread_plan``).
    """
    return ServeSettings().thread_plan(n_models, cores)[1]


def choose_models(exports: list[ExportDir], requested: list[str] | None) -> list[str]:
    """Model names to load-test, teacher first: ``requested`` or every exported name."""
    available = sorted({e.info.name for e in exports}, key=lambda n: (n != "teacher", n))
    names = requested or available
    unknown = [n for n in names if n not in available]
    if unknown:
        raise BenchError(f"--models {','.join(unknown)}: not exported (available: {', '.join(available)})")
    if "teacher" not in names:
        raise BenchError("--models must include teacher: every student is measured against it")
    if len(names) < 2:
        raise BenchError(f"nothing to compare the teacher with (exported models: {', '.join(available)})")
    return ["teacher"] + [n for n in names if n != "teacher"]


def preferred_export(exports: list[ExportDir], name: str, quantization: str | None) -> ExportDir:
    """The export of ``name`` the server answers the bench's requests with: ``--quantization``, or else
    the one its short alias points at (``prefer_quantization``, or the first by name)."""
    variants = [e for e in exports if e.info.name == name]
    wanted = quantization or ServeSettings().prefer_quantization
    return next((e for e in variants if e.info.quantization == wanted), variants[0])


def cascade_student(exports: list[ExportDir], models: list[str], requested: str | None) -> str:
    """The student the bench's cascade starts from: ``requested``, or the first weight-distilled one."""
    if requested is not None:
        if requested not in models[1:]:
            raise BenchError(f"--cascade-student {requested}: not a benched student "
                             f"({', '.join(models[1:])})")
        return requested
    methods = {e.info.name: e.info.method for e in exports}
    return next((m for m in models[1:] if methods.get(m) == "wd"), models[1])


def served_export(listing: list[dict[str, Any]], served_name: str, export_dirs: list[str]) -> str | None:
    """The export directory the server answers ``served_name`` with, read from GET /models."""
    for entry in listing:
        if served_name == entry["name"] or served_name in entry["aliases"]:
            directory = Path(entry["path"]).name
            return directory if directory in export_dirs else None
    return None


# ---------------------------------------------------------------------------------------------------
# The server


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
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
            raise BenchError(f"the server exited with code {process.returncode} before it was ready; "
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
    raise BenchError(f"{url}/ready did not answer 200 within {timeout:.0f}s (last: {last_error})")


@dataclass
class Server:
    url: str
    pid: int | None  # None for a server the bench did not start (--url): its CPU is not accounted


@contextmanager
def running_server(workdir: Path, log_path: Path, timeout: float, extra_args: list[str],
                   cpus: tuple[int, ...] | None = None, host: str = "127.0.0.1", port: int = 0
                   ) -> Iterator[Server]:
    """``wdserve serve`` on ``host`` (a free port unless ``port``), on ``cpus`` when given; SIGTERM (then
    SIGKILL) on the way out.

    The process is pinned right after it starts, long before its interpreter has started a
    thread, so the server sizes its thread pool for its own cores (``available_cores``).
    """
    port = port or free_port(host)
    command = [*SERVE_COMMAND, "--workdir", str(workdir), "--host", host, "--port", str(port),
               *extra_args]
    log.info("starting server%s: %s", f" on CPU(s) {format_cpus(cpus)}" if cpus else "", " ".join(command))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as server_log:
        process = subprocess.Popen(command, stdout=server_log, stderr=subprocess.STDOUT)
    url = f"http://{host}:{port}"
    try:
        if cpus:
            pin_process(process.pid, cpus)
        wait_ready(url, timeout, process, log_path)
        log.info("server ready at %s (pid %d)", url, process.pid)
        yield Server(url, process.pid)
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
                    "avg_ms": _number(row["Average Response Time"]),
                    "percentiles_ms": {key: _number(row[key]) for key in row if key.endswith("%")},
                    "p50_ms": _number(row["50%"]),
                    "p95_ms": _number(row["95%"]),
                    "p99_ms": _number(row["99%"]),
                }
    return {"requests": 0, "failures": 0, "requests_per_s": 0.0, "avg_ms": None, "percentiles_ms": {},
            "p50_ms": None, "p95_ms": None, "p99_ms": None}


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
    sentences_per_request: int
    round: int
    users: int
    model: str  # the model name (teacher, student, ...)
    served_as: str  # what the requests asked for: an alias or an export directory name
    export: str  # the export directory that answers it (the server's name for it in /metrics)

    @property
    def prefix(self) -> str:
        return f"spr{self.sentences_per_request}-r{self.round}-u{self.users:03d}-{self.model}"


@dataclass
class PhaseContext:
    """What every phase of one bench shares."""

    server: Server
    options: BenchOptions
    plan: CpuPlan
    sentences_path: Path
    languages: tuple[str, str]
    locust_dir: Path


def locust_command(phase: Phase, ctx: PhaseContext, prefix: Path) -> list[str]:
    options = ctx.options
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", ctx.server.url,
        "--users", str(phase.users), "--spawn-rate", str(phase.users),
        "--run-time", f"{options.phase_seconds}s", "--csv", str(prefix), "--html", f"{prefix}.html",
        "--only-summary",
        "--exit-code-on-error", "0", "--loglevel", "WARNING",
        "--sentences", str(ctx.sentences_path), "--models", phase.served_as,
        "--sentences-per-request", str(phase.sentences_per_request),
        "--beam-size", str(options.beam_size), "--max-length", str(options.max_length),
        "--source", ctx.languages[0], "--target", ctx.languages[1], "--client-stats", f"{prefix}_client",
    ]
    if options.distributed:  # workers anywhere connect to this master (see README: Load testing)
        command += ["--master", "--master-bind-port", str(options.master_port),
                    "--expect-workers", str(options.locust_workers),
                    "--expect-workers-max-wait", str(round(options.workers_timeout))]
    elif len(ctx.plan.load) > 1 and not ctx.plan.shared:
        command += ["--processes", str(len(ctx.plan.load))]
    return command


def run_phase(phase: Phase, ctx: PhaseContext) -> dict[str, Any]:
    """One headless locust run against one model: locust's numbers, the server's CPU and batches."""
    prefix = ctx.locust_dir / phase.prefix
    duration = ctx.options.phase_seconds
    limit = duration + 120 + (ctx.options.workers_timeout if ctx.options.distributed else 0)
    accounted = ctx.server.pid is not None
    metrics_before = scrape_metrics(ctx.server.url) if accounted else {}
    cpu_before = process_cpu_seconds(ctx.server.pid) if accounted else 0.0
    with open(f"{prefix}.log", "w", encoding="utf-8") as locust_log:
        process = subprocess.Popen(locust_command(phase, ctx, prefix), stdout=locust_log,
                                   stderr=subprocess.STDOUT)
        pin_process(process.pid, ctx.plan.load)
        try:
            returncode = process.wait(timeout=limit)
        except subprocess.TimeoutExpired as err:
            stop_process(process)
            raise BenchError(f"locust did not finish within {limit:.0f}s; see {prefix}.log") from err
    server_cpu_s = process_cpu_seconds(ctx.server.pid) - cpu_before if accounted else None
    metrics_after = scrape_metrics(ctx.server.url) if accounted else {}
    stats_path = Path(f"{prefix}_stats.csv")
    if returncode != 0 or not stats_path.is_file():
        tail = Path(f"{prefix}.log").read_text(encoding="utf-8", errors="replace")[-3000:]
        raise BenchError(f"locust failed (exit code {returncode}); {prefix}.log ends:\n{tail}")
    name = request_name(phase.served_as)
    stats = read_locust_stats(stats_path, name)
    client = read_client_stats(Path(f"{prefix}_client"))
    counted = client["models"].get(phase.served_as, {"responses": 0, "sentences": 0, "words": 0})
    load_utilization = load_busy(client, len(ctx.plan.load), ctx.options.distributed)
    record = {
        **asdict(phase),
        "request_name": name,
        "duration_s": duration,
        **stats,
        # words of the translations per request received, times locust's own request rate
        "words_per_s": round(stats["requests_per_s"] * counted["words"] / counted["responses"], 3)
        if counted["responses"] else 0.0,
        "sentences_per_s": round(stats["requests_per_s"] * phase.sentences_per_request, 3),
        "load_cpu_s": round(client["cpu_s"], 3),
        "load_processes": client["processes"],
        "load_busiest_process": rounded(client["busiest"]),
        "load_utilization": rounded(load_utilization),
        "valid": load_utilization is not None and load_utilization <= LOAD_SATURATED,
        **server_accounting(phase, stats, server_cpu_s, client["wall_s"], ctx, metrics_before, metrics_after),
        "errors": read_locust_failures(Path(f"{prefix}_failures.csv"), name),
        "files": {"stats_csv": stats_path.name, "html": f"{prefix.name}.html"},
    }
    log.info("%s: %.1f req/s, p50 %s p95 %s p99 %s ms, %d failures; server %s ms CPU/request, batch %s; "
             "locust %.0f%% of %d core(s)%s", phase.prefix, record["requests_per_s"], record["p50_ms"],
             record["p95_ms"], record["p99_ms"], record["failures"], record["server_cpu_ms_per_request"],
             record["mean_batch_size"], 100 * (load_utilization or 0), len(ctx.plan.load),
             "" if record["valid"] else " (load generator saturated: phase not valid)")
    return record


def server_accounting(phase: Phase, stats: dict[str, Any], server_cpu_s: float | None, wall_s: float,
                      ctx: PhaseContext, before: dict, after: dict) -> dict[str, Any]:
    """The server's CPU per request and sentence, its busy fraction and its batches over one phase."""
    if server_cpu_s is None:
        return dict.fromkeys(("server_cpu_s", "server_utilization", "server_cpu_ms_per_request",
                              "server_cpu_ms_per_sentence", "requests_per_s_per_core", "batches",
                              "mean_batch_size"))
    batches, batched = batches_between(before, after, phase.export)
    cores = len(ctx.plan.server)
    requests = stats["requests"]
    return {
        "server_cpu_s": round(server_cpu_s, 3),
        "server_utilization": rounded(utilization(server_cpu_s, wall_s, cores)),
        "server_cpu_ms_per_request": rounded(1000 * server_cpu_s / requests) if requests else None,
        "server_cpu_ms_per_sentence": rounded(1000 * server_cpu_s / (requests * phase.sentences_per_request))
        if requests else None,
        "requests_per_s_per_core": rounded(stats["requests_per_s"] / cores),
        "batches": int(batches),
        "mean_batch_size": rounded(batched / batches) if batches else None,
    }


# ---------------------------------------------------------------------------------------------------
# The sweep


def sweep(ctx: PhaseContext, models: list[str], served: dict[str, str], exports: dict[str, str]
          ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every phase of the bench, and why each model's sweep ended, per (sentences per request, round)."""
    options = ctx.options
    phases: list[dict[str, Any]] = []
    endings: list[dict[str, Any]] = []
    for per_request in options.sentences_per_request:
        for round_ in range(options.rounds):
            climbing = list(models)
            levels: dict[str, list[dict[str, Any]]] = {m: [] for m in models}
            for users in options.users:
                for model in climbing:
                    record = run_phase(
                        Phase(per_request, round_, users, model, served[model], exports[model]), ctx)
                    phases.append(record)
                    levels[model].append(record)
                for model in list(climbing):
                    reason = sweep_done(levels[model], options.min_gain)
                    if reason:
                        climbing.remove(model)
                        endings.append({"sentences_per_request": per_request, "round": round_, "model": model,
                                        "users": users, "reason": reason})
                        log.info("sweep of %s (%d sentence(s)/request, round %d) ends at %d users: %s",
                                 model, per_request, round_, users, reason)
                if not climbing:
                    break
            endings += [{"sentences_per_request": per_request, "round": round_, "model": model,
                         "users": options.users[-1], "reason": "last level of --users reached"}
                        for model in climbing]
    return phases, endings


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
    from wdserve.loadtest.plots import write_plots

    workdir = Path(options.workdir)
    out = options.out_dir
    locust_dir = out / "locust"
    locust_dir.mkdir(parents=True, exist_ok=True)
    for stale in locust_dir.glob("spr*"):  # phases of an earlier run would be mistaken for this one's
        if stale.is_file():
            stale.unlink()

    exports = _exports(workdir)
    models = choose_models(exports, options.models)
    plan = CpuPlan.choose(available_cpus(), options.server_cpus, options.load_cpus)
    if plan.shared:
        log.warning("server and load generator share CPU(s) %s: fewer than 2 cores, or overlapping sets; "
                    "throughput is then partly the load generator's", format_cpus(plan.server))
    threads = options.threads or server_threads_per_model(len(exports), len(plan.server))
    sentences, references = read_test_set(workdir, options.max_sentences)
    sentences_path = out / "sentences.src"
    sentences_path.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    teacher = next(e.info for e in exports if e.info.name == "teacher")
    languages = (teacher.source_lang, teacher.target_lang)
    log.info("bench: %s against %s, %d sentences, beam %d; server on CPU(s) %s, load generator on %s, "
             "%d thread(s) per direct run", models[0], ", ".join(models[1:]), len(sentences),
             options.beam_size, format_cpus(plan.server), format_cpus(plan.load), threads)

    direct: dict[str, dict[str, Any]] = {}
    with pinned(plan.server):
        for export in exports:
            direct[export.dir_name] = d = measure_direct(
                export, sentences, references, options.beam_size, options.max_length,
                batch_size=options.direct_batch_size, threads=threads, min_seconds=options.direct_seconds)
            log.info("direct CTranslate2 %s: %.1f sentences/s, p50 %.1f ms, BLEU %.2f, chrF %.2f",
                     export.dir_name, d["sentences_per_s"], d["p50_ms"], d["bleu"], d["chrf"])
        cascade = None
        if options.cascade:
            student = cascade_student(exports, models, options.cascade_student)
            ends = [preferred_export(exports, m, options.quantization) for m in (student, "teacher")]
            cascade = measure_direct_cascade(
                *ends, sentences, references, options.beam_size, options.max_length,
                list(options.cascade_thresholds) if options.cascade_thresholds else None,
                options.direct_batch_size, threads, options.direct_seconds)
            cascade["model"] = student
        if options.pytorch:
            checkpoint = RunDir(workdir).checkpoint("teacher")
            pytorch = measure_pytorch_teacher(checkpoint, sentences, references, options.beam_size,
                                              threads=threads)
        else:
            pytorch = {"skipped": "PyTorch baseline not requested (--no-pytorch)"}

    served = {m: f"{m}-{options.quantization}" if options.quantization else m for m in models}
    server_args = list(options.server_args)
    if cascade is not None:
        server_args += ["--cascade", f"{CASCADE_NAME}={served[cascade['model']]},{served['teacher']}"]
    with _server(options, out, plan, server_args) as server:
        served_exports = _resolve_exports(server.url, served, exports)
        _warm_up(server.url, served, languages, options)
        ctx = PhaseContext(server, options, plan, sentences_path, languages, locust_dir)
        phases, endings = sweep(ctx, models, served, served_exports)
        if cascade is not None:
            cascade = _cascade_report(cascade, server, sentences, references, languages, options, direct,
                                      served_exports["teacher"])

    equal_terms = _direct_at_server_batches(phases, exports, served_exports, sentences, options, plan,
                                            threads)
    report = build_report(options, plan, threads, models, served_exports, exports, direct, pytorch, phases,
                          endings, equal_terms, server.url, cascade)
    report["plots"] = write_plots(report, out)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    write_markdown(report, out / "report.md")
    for line in report["verdict"]:
        log.info("%s", line)
    log.info("report written to %s (report.json, report.md, %s)", out, ", ".join(report["plots"]))
    return report


def _exports(workdir: Path) -> list[ExportDir]:
    try:
        return RunDir(workdir).exports()
    except ArtifactError as err:
        raise BenchError(str(err)) from err


def _direct_at_server_batches(phases: list[dict[str, Any]], exports: list[ExportDir],
                              served_exports: dict[str, str], sentences: list[str], options: BenchOptions,
                              plan: CpuPlan, threads: int) -> dict[str, dict[str, Any]]:
    """Direct CTranslate2 on the server's cores and threads, at the batch size the server itself formed
    for each model at its peak (keyed ``"<export>@<batch size>"``); what the service is priced against."""
    by_dir = {e.dir_name: e for e in exports}
    wanted: dict[str, tuple[ExportDir, int]] = {}
    for model, export in served_exports.items():
        for per_request in options.sentences_per_request:
            best = peak_phase(phases, model, per_request)
            if best is not None and best["mean_batch_size"]:
                batch_size = server_batch_size(best["mean_batch_size"])
                wanted[equal_terms_key(export, batch_size)] = by_dir[export], batch_size
    results = {}
    with pinned(plan.server):
        for key, (export_info, batch_size) in sorted(wanted.items()):
            results[key] = r = measure_direct_cpu(
                export_info, sentences, options.beam_size, options.max_length, batch_size, threads,
                options.direct_seconds)
            log.info("direct CTranslate2 %s: %.1f sentences/s, %.3f ms CPU per sentence", key,
                     r["sentences_per_s"], r["cpu_ms_per_sentence"])
    return results


def _cascade_report(cascade: dict[str, Any], server: Server, sentences: list[str], references: list[str],
                    languages: tuple[str, str], options: BenchOptions, direct: dict[str, dict[str, Any]],
                    teacher: str) -> dict[str, Any]:
    """The direct cascade's points beside the served cascade's BLEU at the same thresholds (not with --url:
    that server serves no cascade of the bench's)."""
    thresholds = [point["threshold"] for point in cascade["points"]]
    served = None
    if server.pid is not None:
        request = {"source": languages[0], "target": languages[1], "beam_size": options.beam_size,
                   "max_length": options.max_length}
        served = served_cascade_quality(lambda body: http_post_json(f"{server.url}/translate", body),
                                        sentences, references, thresholds, request, teacher)
        for point in served:
            log.info("served cascade below %.4f: %.0f%% to the teacher, BLEU %.2f", point["threshold"],
                     100 * point["fallback_share"], point["bleu"])
    return {"model": cascade["model"], **summarize(cascade, served, direct[cascade["teacher"]],
                                                   direct[cascade["student"]])}


@contextmanager
def _server(options: BenchOptions, out: Path, plan: CpuPlan, server_args: list[str]) -> Iterator[Server]:
    if options.url:
        url = options.url.rstrip("/")
        wait_ready(url, options.server_timeout)
        log.warning("benching a server the bench did not start (%s): its CPU time is not accounted", url)
        yield Server(url, None)
    else:
        with running_server(Path(options.workdir), out / "server.log", options.server_timeout,
                            server_args, None if plan.shared else plan.server,
                            host=options.server_host, port=options.server_port) as server:
            yield server


def _resolve_exports(url: str, served_names: dict[str, str], exports: list[ExportDir]) -> dict[str, str]:
    """model name -> export directory that answers it, as the server reports it."""
    try:
        listing = http_get_json(f"{url}/models")
    except (OSError, ValueError) as err:
        raise BenchError(f"cannot read {url}/models: {err}") from err
    dirs = [e.dir_name for e in exports]
    resolved = {}
    for model, served_name in served_names.items():
        found = served_export(listing, served_name, dirs)
        if found is None:
            raise BenchError(f"the server at {url} does not list {served_name!r} in /models "
                             f"(local exports: {', '.join(dirs)}); is it serving {served_name}?")
        resolved[model] = found
        log.info("%s is served by export %s", served_name, found)
    return resolved


def _warm_up(url: str, served_names: dict[str, str], languages: tuple[str, str],
             options: BenchOptions) -> None:
    """One request per model before any phase, so lazy loading never lands in a measurement."""
    for served_name in served_names.values():
        payload = {"q": "warm up", "source": languages[0], "target": languages[1], "model": served_name,
                   "beam_size": options.beam_size, "max_length": options.max_length}
        try:
            http_post_json(f"{url}/translate", payload)
        except urllib.error.HTTPError as err:
            body = err.read().decode("utf-8", errors="replace")[:300]
            raise BenchError(
                f"POST {url}/translate for {served_name!r} failed: HTTP {err.code} {body}") from err
