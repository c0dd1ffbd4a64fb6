"""``wdserve soak``: half the server's capacity for hours, with clients that leave, dawdle or send garbage.

A soak looks for what a benchmark cannot see: memory that creeps up, descriptors that leak,
errors that show up after an hour. The load is open-loop, as on the internet: clients arrive at
a fixed mean rate (Poisson) whether or not earlier ones were answered, by default half the
capacity a short closed-loop calibration finds. Each arrival is one of four kinds of client:

- **normal**: POST /translate with one test sentence on a keep-alive connection, read the answer;
- **abandon**: a request of several sentences, then the connection closed a few ms later;
- **slow**: the headers, then the body a byte at a time, until the server answers or closes;
- **malformed**: broken JSON, bytes that are not HTTP, oversized headers, a body cut off
  mid-way, invalid UTF-8 or an unsupported content type.

Every ``--sample-s`` it records the server's RSS and open descriptors (psutil), the machine's
load average, the server's own counts (``/metrics``) and the normal clients' latencies. After
the load it closes its connections and waits for the server's descriptors to come back to what
they were before. ``--burst KIND:N@T`` adds N clients of one kind at once, T seconds into the
load, and reports what happened to them and to the normal clients meanwhile.

Everything goes over HTTP (raw sockets, since misbehaving is the point); only the server's RSS and
descriptors come from the kernel, so a server the soak did not start needs ``--server-pid``.
Output: OUT/soak.json (every sample), OUT/soak.md and, for a server it started, OUT/server.log.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import re
import statistics
import time
from array import array
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wdserve.errors import WdserveError

log = logging.getLogger("wdserve.soak")

KINDS = ("normal", "abandon", "slow", "malformed")
MALFORMED = ("bad-json", "bad-http", "huge-header", "cut-body", "bad-utf8", "bad-type")
RESPONSE_TIMEOUT_S = 60.0  # a normal client gives up after this (the server's own deadline is shorter)
POOL_IDLE_S = 1.0  # reuse a keep-alive connection only this long; the server closes idle ones after 5 s
MAX_OPEN_CLIENTS = 20000  # beyond this the generator, not the server, is the bottleneck: arrivals are dropped
RSS_GROWTH_TARGET = 0.05
BURST_SETTLE_S = 5.0


class SoakError(WdserveError, RuntimeError):
    """The soak cannot run as asked."""


@dataclass(frozen=True)
class Burst:
    kind: str
    count: int
    at_s: float

    @classmethod
    def parse(cls, text: str) -> Burst:
        match = re.fullmatch(r"(\w+):(\d+)(?:@(\d+(?:\.\d+)?))?", text.strip())
        if not match or match.group(1) not in KINDS or int(match.group(2)) < 1:
            raise ValueError(f"expected KIND:COUNT[@SECONDS], KIND one of {', '.join(KINDS)}; got {text!r}")
        return cls(match.group(1), int(match.group(2)), float(match.group(3) or 0))


@dataclass
class SoakOptions:
    out: Path
    workdir: Path | None = None
    url: str | None = None
    server_pid: int | None = None
    server_args: list[str] = field(default_factory=list)
    duration_s: float = 1800.0
    warmup_s: float = 120.0
    cooldown_s: float = 60.0
    sample_s: float = 10.0
    rate: float | None = None  # arrivals per second; None = load x calibrated capacity
    load: float = 0.5
    calibrate_s: float = 20.0
    calibrate_users: int = 32
    model: str | None = None
    sentences: Path | None = None
    abandon: float = 0.02
    slow: float = 0.01
    malformed: float = 0.02
    abandon_model: str = "teacher"
    abandon_sentences: int = 10
    abandon_after_ms: float = 20.0
    slow_interval_s: float = 1.0
    bursts: list[Burst] = field(default_factory=list)
    seed: int = 1

    def shares(self) -> dict[str, float]:
        misbehaving = self.abandon + self.slow + self.malformed
        if misbehaving >= 1:
            raise SoakError(f"--abandon + --slow + --malformed = {misbehaving:g}; they must leave room for "
                            f"normal clients (< 1)")
        return {"normal": 1 - misbehaving, "abandon": self.abandon, "slow": self.slow,
                "malformed": self.malformed}


# ---------------------------------------------------------------------------------------------------
# HTTP on raw sockets


def http_post(path: str, body: bytes, content_type: str = "application/json",
              content_length: int | None = None, extra: str = "") -> bytes:
    length = len(body) if content_length is None else content_length
    return (f"POST {path} HTTP/1.1\r\nHost: wdserve\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {length}\r\n{extra}\r\n").encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length (every answer of uvicorn and the app has one)."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionResetError("closed before a response")
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    return status, headers, await reader.readexactly(length) if length else b""


def status_of(answer: bytes) -> str:
    """``"408"`` from a raw answer, ``"closed"`` when the server closed without one."""
    match = re.match(rb"HTTP/1\.[01] (\d{3})", answer)
    return match.group(1).decode() if match else "closed"


def close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, RuntimeError):
        writer.close()


class Pool:
    """Keep-alive connections of the normal clients, reused while fresh."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []

    async def get(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        now = time.monotonic()
        while self.idle:
            reader, writer, used = self.idle.pop()
            if now - used < POOL_IDLE_S and not reader.at_eof():
                return reader, writer, True
            close(writer)
        reader, writer = await asyncio.open_connection(self.host, self.port)
        return reader, writer, False

    def put(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.idle.append((reader, writer, time.monotonic()))

    def close(self) -> None:
        for _, writer, _ in self.idle:
            close(writer)
        self.idle.clear()


# ---------------------------------------------------------------------------------------------------
# The clients


class Clients:
    """The four kinds of client against one server, and what happened to each."""

    def __init__(self, options: SoakOptions, host: str, port: int, sentences: list[str], model: str | None):
        self.options = options
        self.host, self.port = host, port
        self.sentences = sentences
        self.model = model
        self.pool = Pool(host, port)
        self.rng = random.Random(options.seed)
        self.outcomes: dict[str, Counter[str]] = {kind: Counter() for kind in KINDS}
        self.normal_times = array("d")  # when each answered normal request started (monotonic)
        self.normal_latencies = array("d")  # and how long it took, seconds
        self.slow_closed_s = array("d")  # per slow client: headers sent -> server closed
        self.tasks: set[asyncio.Task] = set()
        self.dropped = 0
        self._next_sentence = 0

    def spawn(self, kind: str) -> asyncio.Task | None:
        if len(self.tasks) >= MAX_OPEN_CLIENTS:
            self.dropped += 1
            return None
        task = asyncio.get_running_loop().create_task(getattr(self, kind)())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def sentence(self) -> str:
        self._next_sentence = (self._next_sentence + 1) % len(self.sentences)
        return self.sentences[self._next_sentence]

    def _body(self, q: str | list[str], model: str | None) -> bytes:
        return json.dumps({"q": q, **({"model": model} if model else {})}).encode()

    async def normal(self) -> bool:
        """One request; True when it was answered 200."""
        request = http_post("/translate", self._body(self.sentence(), self.model))
        started = time.monotonic()
        for attempt in (1, 2):
            try:
                reader, writer, reused = await self.pool.get()
            except OSError:
                self.outcomes["normal"]["connect-error"] += 1
                return False
            try:
                writer.write(request)
                status, headers, _ = await asyncio.wait_for(read_response(reader), RESPONSE_TIMEOUT_S)
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                close(writer)
                if reused and attempt == 1:  # the server closed an idle connection as we reused it
                    continue
                self.outcomes["normal"]["connection-error"] += 1
                return False
            except asyncio.TimeoutError:
                close(writer)
                self.outcomes["normal"]["timeout"] += 1
                return False
            if headers.get("connection", "").lower() == "close":
                close(writer)
            else:
                self.pool.put(reader, writer)
            self.outcomes["normal"][str(status)] += 1
            if status == 200:
                self.normal_times.append(started)
                self.normal_latencies.append(time.monotonic() - started)
            return status == 200
        return False

    async def abandon(self) -> None:
        options = self.options
        body = self._body([self.sentence() for _ in range(options.abandon_sentences)], options.abandon_model)
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
            writer.write(http_post("/translate", body))
            await writer.drain()
            try:  # an answer within the time means it was answered (or refused) before we left
                status, _, _ = await asyncio.wait_for(read_response(reader), options.abandon_after_ms / 1000)
                self.outcomes["abandon"][f"answered-{status}"] += 1
            except asyncio.TimeoutError:
                self.outcomes["abandon"]["left"] += 1
            close(writer)
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            self.outcomes["abandon"]["connection-error"] += 1

    async def slow(self) -> None:
        # a valid body, padded so that a byte per interval takes longer than any sensible deadline
        body = self._body(self.sentence(), self.model)
        body = body[:-1] + b" " * max(0, 600 - len(body)) + b"}"
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
            writer.write(http_post("/translate", b"", content_length=len(body)))
            await writer.drain()
        except OSError:
            self.outcomes["slow"]["connect-error"] += 1
            return
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        interval = self.options.slow_interval_s
        sent = 0

        def drip() -> None:  # a timer, not a task a byte: thousands of these must not load the generator
            nonlocal sent, timer
            if sent < len(body) and not writer.is_closing():
                writer.write(body[sent:sent + 1])
                sent += 1
                timer = loop.call_later(interval, drip)

        # a random phase, so that a burst's clients do not all send in the same instant every second
        timer = loop.call_later(self.rng.uniform(0, interval), drip)
        try:
            answer = await reader.read()  # whatever the server says, until it closes
        except OSError:
            answer = b""
        finally:
            timer.cancel()
        self.slow_closed_s.append(time.monotonic() - started)
        self.outcomes["slow"][status_of(answer)] += 1
        close(writer)

    async def malformed(self) -> None:
        kind = self.rng.choice(MALFORMED)
        request = {
            "bad-json": http_post("/translate", b'{"q": "unterminated'),
            "bad-http": b"THIS IS NOT HTTP\r\n\r\n",
            "huge-header": b"GET /health HTTP/1.1\r\nHost: wdserve\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n",
            "cut-body": http_post("/translate", b'{"q": "this', content_length=200),
            "bad-utf8": http_post("/translate", b'{"q": "\xff\xfe"}'),
            "bad-type": http_post("/translate", b"q", content_type="text/plain"),
        }[kind]
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
            writer.write(request)
            await writer.drain()
            if kind == "cut-body":  # leaves mid-body
                close(writer)
                self.outcomes["malformed"][f"{kind}-left"] += 1
                return
            answer = await asyncio.wait_for(reader.read(), RESPONSE_TIMEOUT_S)
            self.outcomes["malformed"][f"{kind}-{status_of(answer)}"] += 1
            close(writer)
        except (OSError, asyncio.TimeoutError):
            self.outcomes["malformed"][f"{kind}-connection-error"] += 1

    async def closed_loop(self, users: int, seconds: float) -> float:
        """Requests per second of ``users`` normal clients that send again as soon as answered."""
        until = time.monotonic() + seconds
        answered = 0

        async def user() -> None:
            nonlocal answered
            while time.monotonic() < until:
                ok = await self.normal()
                answered += ok

        started = time.monotonic()
        await asyncio.gather(*(user() for _ in range(users)))
        return answered / (time.monotonic() - started)

    async def arrivals(self, rate: float, shares: dict[str, float], until: float) -> None:
        """Poisson arrivals at ``rate`` per second, each of a kind drawn by ``shares``, until ``until``."""
        kinds, weights = zip(*[(kind, share) for kind, share in shares.items() if share > 0], strict=True)
        next_at = time.monotonic()
        while True:
            next_at += self.rng.expovariate(rate)
            if next_at >= until:
                return
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            self.spawn(self.rng.choices(kinds, weights)[0])

    async def burst(self, kind: str, count: int) -> None:
        """``count`` clients of ``kind`` at once (connections opened a hundred at a time)."""
        tasks = []
        for start in range(0, count, 100):
            tasks += [task for _ in range(min(100, count - start)) if (task := self.spawn(kind)) is not None]
            await asyncio.sleep(0.02)
        await asyncio.gather(*tasks, return_exceptions=True)

    def latencies_between(self, start: float, end: float) -> list[float]:
        return [latency for at, latency in zip(self.normal_times, self.normal_latencies, strict=True)
                if start <= at < end]

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {kind: dict(counts) for kind, counts in self.outcomes.items()}


# ---------------------------------------------------------------------------------------------------
# What the server shows


class ServerWatch:
    """RSS, descriptors and /metrics of the server, and the machine's load, sampled over time."""

    def __init__(self, url: str, pid: int | None):
        import psutil

        self.url = url
        self.process = psutil.Process(pid) if pid else None
        self.samples: list[dict[str, Any]] = []
        self.started = time.monotonic()

    def resources(self) -> dict[str, Any]:
        if self.process is None:
            return {}
        with self.process.oneshot():
            times = self.process.cpu_times()
            return {"rss_mb": round(self.process.memory_info().rss / 2**20, 2), "fds": self.process.num_fds(),
                    "cpu_s": round(times.user + times.system, 2)}

    def metrics(self) -> dict[str, float]:
        """The server's counts, summed over routes and models: requests by status, sentences, cancelled.

        Empty when /metrics does not answer within 10 s (the sample then says so).
        """
        from wdserve.loadtest.accounting import scrape_metrics

        counts: dict[str, float] = Counter()
        try:
            scraped = scrape_metrics(self.url)
        except (OSError, ValueError) as err:
            log.warning("%s/metrics did not answer: %s", self.url, err)
            return {}
        for (name, labels), value in scraped.items():
            label = dict(labels)
            if name == "wdserve_requests_total":
                counts[f"status_{label['status']}"] += value
            elif name == "wdserve_sentences_total":
                counts["sentences"] += value
                counts[f"sentences_{label['model']}"] += value
            elif name == "wdserve_cancelled_sentences_total":
                counts["cancelled_sentences"] += value
        return dict(counts)

    async def sample(self, phase: str, clients: Clients | None, since: float) -> dict[str, Any]:
        metrics = await asyncio.to_thread(self.metrics)
        now = time.monotonic()
        loadavg = [float(value) for value in Path("/proc/loadavg").read_text().split()[:3]]
        sample: dict[str, Any] = {"t_s": round(now - self.started, 1), "phase": phase, **self.resources(),
                                  "loadavg": loadavg}
        if clients is not None:
            latencies = clients.latencies_between(since, now)
            sample.update(open_clients=len(clients.tasks), normal_answered=len(latencies),
                          normal_p50_ms=_ms(_quantile(latencies, 0.5)),
                          normal_p95_ms=_ms(_quantile(latencies, 0.95)))
        sample["server"] = metrics
        self.samples.append(sample)
        return sample


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {key: after.get(key, 0) - before.get(key, 0) for key in sorted(set(after) | set(before))
            if after.get(key, 0) != before.get(key, 0)}


# ---------------------------------------------------------------------------------------------------
# The run


async def soak(options: SoakOptions, url: str, pid: int | None, log_path: Path | None) -> dict[str, Any]:
    from wdserve.loadtest.bench import http_get_json

    host, port = re.match(r"https?://([^:/]+):(\d+)", url).groups()
    listing = http_get_json(f"{url}/models")
    served = {name for entry in listing for name in (entry["name"], *entry.get("aliases", []))}
    for name in filter(None, (options.model, options.abandon_model if options.abandon else None)):
        if name not in served:
            raise SoakError(f"the server does not serve {name!r} (it serves {', '.join(sorted(served))})")
    abandon_served = next((entry["name"] for entry in listing
                           if options.abandon_model in (entry["name"], *entry.get("aliases", []))), None)
    clients = Clients(options, host, int(port), read_sentences(options), options.model)
    watch = ServerWatch(url, pid)
    shares = options.shares()
    baseline = await watch.sample("baseline", None, 0)
    log.info("baseline: %s", _brief(baseline))

    rate = options.rate
    capacity = None
    if rate is None:
        log.info("calibrating: %d closed-loop normal clients for %.0f s", options.calibrate_users,
                 options.calibrate_s)
        capacity = await clients.closed_loop(options.calibrate_users, options.calibrate_s)
        rate = options.load * capacity
        clients.pool.close()
        log.info("capacity %.0f requests/s; soaking at %.0f arrivals/s", capacity, rate)
    clients.normal_times, clients.normal_latencies = array("d"), array("d")
    clients.outcomes = {kind: Counter() for kind in KINDS}
    before_load = await watch.sample("before-load", None, 0)

    started = time.monotonic()
    until = started + options.warmup_s + options.duration_s
    arrivals = asyncio.get_running_loop().create_task(clients.arrivals(rate, shares, until))
    bursts = [asyncio.get_running_loop().create_task(
        run_burst(clients, watch, burst, started, abandon_served)) for burst in options.bursts]
    since = started
    while time.monotonic() < until:
        await asyncio.sleep(min(options.sample_s, max(0.0, until - time.monotonic())))
        phase = "warm-up" if time.monotonic() - started < options.warmup_s else "load"
        sample = await watch.sample(phase, clients, since)
        since = time.monotonic()
        log.info("%s %5.0f s: %s", phase, sample["t_s"], _brief(sample))
    await arrivals
    burst_reports = await asyncio.gather(*bursts)
    if clients.tasks:  # slow clients last until the server closes them
        log.info("load over; waiting for %d clients still open", len(clients.tasks))
        await asyncio.wait(set(clients.tasks), timeout=RESPONSE_TIMEOUT_S)
    clients.pool.close()
    load_end = await watch.sample("load-end", clients, since)

    cooldown_until = time.monotonic() + options.cooldown_s
    while time.monotonic() < cooldown_until:
        await asyncio.sleep(1.0)
        last = await watch.sample("cool-down", None, 0)
        if pid is None or last["fds"] <= baseline["fds"]:
            break
    after = watch.samples[-1]
    return build_soak_report(options, url, pid, capacity, rate, shares, watch.samples, baseline, before_load,
                             load_end, after, clients, burst_reports, log_path)


async def run_burst(clients: Clients, watch: ServerWatch, burst: Burst, started: float,
                    abandon_served: str | None) -> dict[str, Any]:
    await asyncio.sleep(max(0.0, started + burst.at_s - time.monotonic()))
    before = await asyncio.to_thread(watch.metrics)
    before_outcomes = clients.snapshot()
    slow_before = len(clients.slow_closed_s)
    begin = time.monotonic()
    log.info("burst: %d %s clients", burst.count, burst.kind)
    await clients.burst(burst.kind, burst.count)
    end = time.monotonic()
    await asyncio.sleep(BURST_SETTLE_S)  # a batch already running for the burst finishes and is counted
    after = await asyncio.to_thread(watch.metrics)
    outcomes = {kind: _delta(counts, before_outcomes.get(kind, {}))
                for kind, counts in clients.snapshot().items()}
    server = _delta(after, before)
    baseline_latencies = clients.latencies_between(begin - 30, begin)
    during = clients.latencies_between(begin, end)
    report: dict[str, Any] = {
        **asdict(burst), "seconds": round(end - begin, 2), "clients": outcomes[burst.kind], "server": server,
        "normal_before": _answered(baseline_latencies), "normal_during": _answered(during)}
    if burst.kind == "slow":
        closed = sorted(clients.slow_closed_s[slow_before:])
        report["slow_closed_s"] = {"max": round(closed[-1], 2) if closed else None,
                                   "p50": round(_quantile(closed, 0.5), 2) if closed else None}
    if burst.kind == "abandon" and abandon_served:
        sent = burst.count * clients.options.abandon_sentences
        translated = server.get(f"sentences_{abandon_served}", 0)
        report["abandon"] = {"model": abandon_served, "sentences_sent": sent, "translated": translated,
                             "translated_share": round(translated / sent, 4),
                             "cancelled": server.get("cancelled_sentences", 0),
                             "note": "translated counts every sentence of this model in the window: "
                                     "exact when the normal clients use another model"}
    log.info("burst of %d %s clients done in %.1f s: %s", burst.count, burst.kind, end - begin, report)
    return report


def _answered(latencies: list[float]) -> dict[str, Any]:
    return {"answered": len(latencies), "p50_ms": _ms(_quantile(latencies, 0.5)),
            "p95_ms": _ms(_quantile(latencies, 0.95))}


def read_sentences(options: SoakOptions) -> list[str]:
    path = options.sentences or (options.workdir / "data" / "test.src" if options.workdir else None)
    if path is None:
        return ["this book finds a tree"]
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as err:
        raise SoakError(f"cannot read test sentences from {path}: {err}") from err
    return lines or ["this book finds a tree"]


def _brief(sample: dict[str, Any]) -> str:
    server = sample.get("server", {})
    shown = {key: sample[key] for key in ("rss_mb", "fds", "open_clients", "normal_answered", "normal_p95_ms")
             if key in sample}
    shown.update({key: value for key, value in server.items()
                  if key.startswith("status_") or key == "cancelled_sentences"})
    return " ".join(f"{key}={value}" for key, value in shown.items())


def count_log_errors(log_path: Path | None) -> dict[str, int] | None:
    if log_path is None or not log_path.exists():
        return None
    text = log_path.read_text(encoding="utf-8", errors="replace")
    return {"error_lines": sum(" ERROR " in line or line.startswith("ERROR") for line in text.splitlines()),
            "tracebacks": text.count("Traceback"),
            "warning_lines": sum("WARNING" in line for line in text.splitlines())}


def build_soak_report(options: SoakOptions, url: str, pid: int | None, capacity: float | None, rate: float,
                      shares: dict[str, float], samples: list[dict[str, Any]], baseline: dict[str, Any],
                      before_load: dict[str, Any],
                      load_end: dict[str, Any], after: dict[str, Any], clients: Clients,
                      bursts: list[dict[str, Any]], log_path: Path | None) -> dict[str, Any]:
    from wdserve.loadtest.report import machine

    load_samples = [s for s in samples if s["phase"] == "load" and "rss_mb" in s]
    server = _delta(load_end["server"], before_load["server"])
    statuses = {key.removeprefix("status_"): value for key, value in server.items()
                if key.startswith("status_")}
    server_5xx = {status: count for status, count in statuses.items() if status.startswith("5")}
    client_5xx = {f"{kind} {status}": count for kind, counts in clients.snapshot().items()
                  for status, count in counts.items() if re.search(r"(^|-)5\d\d$", status)}
    summary: dict[str, Any] = {
        "answered": statuses.get("200", 0), "cancelled_requests": statuses.get("499", 0),
        "cancelled_sentences": server.get("cancelled_sentences", 0), "shed_503": statuses.get("503", 0),
        "statuses": statuses, "server_5xx": server_5xx, "client_5xx": client_5xx,
        "clients": clients.snapshot(), "generator_dropped": clients.dropped,
        "normal_p50_ms": _ms(_quantile(list(clients.normal_latencies), 0.5)),
        "normal_p95_ms": _ms(_quantile(list(clients.normal_latencies), 0.95)),
        "slow_closed_max_s": round(max(clients.slow_closed_s), 2) if clients.slow_closed_s else None,
        "loadavg_1min": _spread([s["loadavg"][0] for s in samples if s["phase"] in ("warm-up", "load")]),
        "log": count_log_errors(log_path),
    }
    targets = []
    if load_samples:
        first, last = load_samples[0]["rss_mb"], load_samples[-1]["rss_mb"]
        peak = max(s["rss_mb"] for s in load_samples)
        growth = (last - first) / first
        summary["rss_mb"] = {"idle": baseline.get("rss_mb"), "after_warmup": first, "end": last,
                             "peak": peak, "growth_after_warmup": round(growth, 4)}
        targets.append({"target": f"RSS growth after warm-up under {RSS_GROWTH_TARGET:.0%}",
                        "value": f"{growth:+.2%} ({first:.1f} -> {last:.1f} MB, peak {peak:.1f} MB)",
                        "met": growth < RSS_GROWTH_TARGET})
    if "fds" in baseline:  # the idle server's, before the calibration opened any connection
        summary["fds"] = {"idle": baseline["fds"], "peak": max(s.get("fds", 0) for s in samples),
                          "after_cooldown": after["fds"]}
        targets.append({"target": "open descriptors back to the pre-load count after the load",
                        "value": f"{baseline['fds']} before, {after['fds']} after "
                                 f"(peak {summary['fds']['peak']})",
                        "met": after["fds"] <= baseline["fds"]})
    targets.append({"target": "zero 5xx (503 load shedding included)",
                    "value": f"server counted {server_5xx or 'none'}; clients saw {client_5xx or 'none'}",
                    "met": not server_5xx and not client_5xx})
    if summary["log"] is not None:
        targets.append({"target": "no ERROR lines or tracebacks in the server log",
                        "value": f"{summary['log']['error_lines']} ERROR lines, "
                                 f"{summary['log']['tracebacks']} tracebacks",
                        "met": summary["log"]["error_lines"] == 0 and summary["log"]["tracebacks"] == 0})
    return {"options": {**asdict(options), "out": str(options.out)}, "url": url, "server_pid": pid,
            "machine": machine(), "capacity_rps": capacity and round(capacity, 1), "rate": round(rate, 1),
            "shares": shares, "summary": summary, "targets": targets, "bursts": bursts, "samples": samples}


def _spread(values: list[float]) -> dict[str, float] | None:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)} if values else None


def render_markdown(report: dict[str, Any]) -> str:
    options, summary = report["options"], report["summary"]
    lines = [
        "# wdserve soak",
        "",
        f"Server {report['url']} (pid {report['server_pid']}), {report['machine']['processor']}; "
        f"{options['warmup_s']:g} s warm-up + {options['duration_s']:g} s load at {report['rate']:g} "
        "arrivals/s"
        + (f" (half-capacity from a calibrated {report['capacity_rps']:g} requests/s)"
           if report["capacity_rps"] else "")
        + "; shares " + ", ".join(f"{kind} {share:.0%}" for kind, share in report["shares"].items()) + ".",
        f"Machine load average (1 min) during the load: {summary['loadavg_1min']}.",
        "",
        "## Targets",
        "",
        "| target | value | met |",
        "|---|---|---|",
        *[f"| {target['target']} | {target['value']} | {'met' if target['met'] else '**missed**'} |"
          for target in report["targets"]],
        "",
        "## Requests",
        "",
        f"Answered 200: {summary['answered']:g}; cancelled (499): {summary['cancelled_requests']:g} "
        "requests, "
        f"{summary['cancelled_sentences']:g} sentences; shed (503): {summary['shed_503']:g}; "
        f"normal p50 {summary['normal_p50_ms']} ms, p95 {summary['normal_p95_ms']} ms; "
        f"slow clients closed after at most {summary['slow_closed_max_s']} s.",
        f"Server statuses: {summary['statuses']}.",
        f"Client outcomes: {summary['clients']}.",
    ]
    for burst in report["bursts"]:
        lines += ["", f"## Burst: {burst['count']} {burst['kind']} clients at {burst['at_s']:g} s", "",
                  "```", json.dumps(burst, indent=1, default=str), "```"]
    samples = [s for s in report["samples"] if "rss_mb" in s]
    step = max(1, len(samples) // 40)
    lines += ["", "## Over time", "", "| t (s) | phase | RSS MB | fds | open clients | normal/interval | "
              "p95 ms | loadavg |", "|---|---|---|---|---|---|---|---|"]
    for sample in samples[::step] + ([samples[-1]] if samples and (len(samples) - 1) % step else []):
        lines.append(f"| {sample['t_s']:g} | {sample['phase']} | {sample['rss_mb']} | {sample['fds']} | "
                     f"{sample.get('open_clients', '')} | {sample.get('normal_answered', '')} | "
                     f"{sample.get('normal_p95_ms', '')} | {sample['loadavg'][0]} |")
    return "\n".join(lines) + "\n"


def raise_open_file_limit(needed: int) -> None:
    """Slow clients each hold a connection; let this process hold as many as the bursts ask for."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed if hard == resource.RLIM_INFINITY
                                                    else min(needed, hard), hard))


def run(options: SoakOptions) -> dict[str, Any]:
    from wdserve.loadtest.bench import running_server, wait_ready

    options.out.mkdir(parents=True, exist_ok=True)
    raise_open_file_limit(4096 + sum(burst.count for burst in options.bursts))
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    if options.url:
        url = options.url.rstrip("/")
        wait_ready(url, 60)
        if options.server_pid is None:
            log.warning("no --server-pid: RSS and descriptors of %s are not sampled", url)
        report = runner(soak(options, url, options.server_pid, None))
    else:
        if options.workdir is None:
            raise SoakError("give --workdir (the soak starts `wdserve serve` on it) or the --url of a server")
        log_path = options.out / "server.log"
        with running_server(options.workdir, log_path, 120, options.server_args) as server:
            report = runner(soak(options, server.url, server.pid, log_path))
    (options.out / "soak.json").write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    (options.out / "soak.md").write_text(render_markdown(report), encoding="utf-8")
    for target in report["targets"]:
        log.info("%s: %s (%s)", target["target"], target["value"], "met" if target["met"] else "MISSED")
    log.info("report: %s", options.out / "soak.md")
    return report


# ---------------------------------------------------------------------------------------------------
# Command line


def _seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smh]?)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"expected a duration such as 90, 90s, 30m or 2h, got {text!r}")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def _share(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a share in [0, 1), got {text}")
    return value


def _burst(text: str) -> Burst:
    try:
        return Burst.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def configure_soak(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, help="run directory: start `wdserve serve` on it (and read "
                                                     "DIR/data/test.src for sentences)")
    parser.add_argument("--url", help="soak a running server instead of starting one")
    parser.add_argument("--server-pid", type=int, help="with --url: the server's pid (for its RSS and fds)")
    parser.add_argument("--server-arg", dest="server_args", action="append", default=[], metavar="ARG",
                        help="extra `wdserve serve` argument (repeatable): --server-arg=--body-timeout-s=5")
    parser.add_argument("--out", type=Path, default=None, help="report directory (default DIR/soak)")
    parser.add_argument("--duration", dest="duration_s", type=_seconds, default=1800.0,
                        help="load after the warm-up: 90, 90s, 30m, 2h (default 30m)")
    parser.add_argument("--warmup", dest="warmup_s", type=_seconds, default=120.0,
                        help="load before RSS growth is measured from (default 2m)")
    parser.add_argument("--cooldown", dest="cooldown_s", type=_seconds, default=60.0,
                        help="longest wait for descriptors to come back after the load (default 60s)")
    parser.add_argument("--sample", dest="sample_s", type=_seconds, default=10.0, help="sampling interval")
    parser.add_argument("--rate", type=float, default=None,
                        help="arrivals per second (default: --load x the calibrated capacity)")
    parser.add_argument("--load", type=float, default=0.5, help="fraction of capacity (default 0.5)")
    parser.add_argument("--calibrate", dest="calibrate_s", type=_seconds, default=20.0,
                        help="closed-loop calibration of capacity, before the soak (default 20s)")
    parser.add_argument("--calibrate-users", type=int, default=32)
    parser.add_argument("--model", default=None, help="model of the normal clients (default: the server's)")
    parser.add_argument("--sentences", type=Path, default=None, help="one sentence a line (default "
                                                                      "DIR/data/test.src)")
    parser.add_argument("--abandon", type=_share, default=0.02, help="share of abandoning clients (0.02)")
    parser.add_argument("--slow", type=_share, default=0.01, help="share of slow clients (0.01)")
    parser.add_argument("--malformed", type=_share, default=0.02, help="share of malformed requests (0.02)")
    parser.add_argument("--abandon-model", default="teacher", help="abandoning clients ask for it (teacher)")
    parser.add_argument("--abandon-sentences", type=int, default=10, help="sentences per abandoned request")
    parser.add_argument("--abandon-after-ms", type=float, default=20.0,
                        help="abandoning clients close the connection this long after sending")
    parser.add_argument("--slow-interval", dest="slow_interval_s", type=_seconds, default=1.0,
                        help="slow clients send a body byte this often (default 1s)")
    parser.add_argument("--burst", dest="bursts", type=_burst, action="append", default=[],
                        metavar="KIND:N[@T]", help="N clients of KIND at once, T seconds into the load "
                                                   "(repeatable), e.g. slow:3000@30")
    parser.add_argument("--seed", type=int, default=1)


def run_soak(args: argparse.Namespace) -> None:
    if args.out is None and args.workdir is None:
        raise SoakError("give --out when soaking a --url without --workdir")
    options = SoakOptions(**{name: value for name, value in vars(args).items()
                             if name in SoakOptions.__dataclass_fields__ and name != "out"},
                          out=args.out or args.workdir / "soak")
    report = run(options)
    if not all(target["met"] for target in report["targets"]):
        log.warning("some targets were missed; see %s", options.out / "soak.md")
