"""Prometheus metrics, one registry per app (tests create many apps in one process)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from wdserve.server.batching import BatchStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99, 1.0)
CHRF_BUCKETS = (10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 99.99, 100)  # 99.99: all but identical
NO_MODEL = "-"  # label when a request never got as far as naming a served model


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("wdserve_requests", "HTTP requests by route, model and status",
                                ["route", "model", "status"], registry=r)
        self.errors = Counter("wdserve_errors", "HTTP responses with status >= 400",
                              ["route", "model", "status"], registry=r)
        self.latency = Histogram("wdserve_request_latency_seconds", "request latency",
                                 ["route", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_progress = Gauge("wdserve_requests_in_progress", "requests being handled", registry=r)
        self.batch_size = Histogram("wdserve_batch_size", "sentences per translate_batch call",
                                    ["model"], buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.batch_seconds = Histogram("wdserve_batch_seconds", "duration of one translate_batch call",
                                       ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("wdserve_queue_depth", "sentences waiting for a batch", ["model"],
                                 registry=r)
        self.output_tokens = Counter("wdserve_output_tokens", "generated target tokens", ["model"],
                                     registry=r)
        self.tokens_per_second = Gauge("wdserve_tokens_per_second",
                                       "output tokens per second of the latest batch", ["model"], registry=r)
        self.sentences = Counter("wdserve_sentences", "sentences translated", ["model"], registry=r)
        self.cancelled_sentences = Counter(
            "wdserve_cancelled_sentences", "queued sentences withdrawn untranslated: their client left",
            ["model"], registry=r)
        self.confidence = Histogram(
            "wdserve_sentence_confidence", "confidence of each scored sentence (geometric-mean token "
            "probability; scored when a request asks for confidence, and always for a cascade's student)",
            ["model"], buckets=CONFIDENCE_BUCKETS, registry=r)
        self.cascade_sentences = Counter(
            "wdserve_cascade_sentences", "a cascade's sentences by outcome: student (confident), teacher "
            "(re-translated), degraded (unsure, but the teacher was busy or failed)", ["cascade", "outcome"],
            registry=r)
        self.shadow_chrf = Histogram(
            "wdserve_shadow_chrf", "chrF of a model's sentence against the shadow reference's translation",
            ["model"], buckets=CHRF_BUCKETS, registry=r)
        self.shadow_dropped = Counter(
            "wdserve_shadow_dropped", "shadow requests dropped, by reason: queue (full), busy (a queue "
            "held a batch), reference (refused, late or failed)", ["model", "reason"], registry=r)
        # labelled children by label values: .labels() validates and locks on every call, and
        # these run several times a request; every label set is bounded (routes, models, statuses)
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any, Any]] = {}
        self._queue_depth_children: dict[str, Any] = {}

    def observe_request(self, route: str, model: str, status: int, seconds: float) -> None:
        children = self._request_children.get((route, model, status))
        if children is None:
            children = self._request_children[route, model, status] = (
                self.requests.labels(route, model, str(status)),
                self.errors.labels(route, model, str(status)) if status >= 400 else None,
                self.latency.labels(route, model))
        requests, errors, latency = children
        requests.inc()
        if errors is not None:
            errors.inc()
        latency.observe(seconds)

    def observe_batch(self, stats: BatchStats) -> None:
        self.batch_size.labels(stats.model).observe(stats.size)
        self.batch_seconds.labels(stats.model).observe(stats.seconds)
        self.output_tokens.labels(stats.model).inc(stats.output_tokens)
        self.sentences.labels(stats.model).inc(stats.size)
        if stats.seconds > 0:
            self.tokens_per_second.labels(stats.model).set(stats.output_tokens / stats.seconds)

    def observe_cancelled(self, model: str, sentences: int) -> None:
        self.cancelled_sentences.labels(model).inc(sentences)

    def observe_confidence(self, model: str, values: list[float]) -> None:
        child = self.confidence.labels(model)
        for value in values:
            child.observe(value)

    def observe_cascade(self, cascade: str, outcomes: dict[str, int]) -> None:
        for outcome, sentences in outcomes.items():
            self.cascade_sentences.labels(cascade, outcome).inc(sentences)

    def observe_shadow(self, model: str, scores: list[float]) -> None:
        child = self.shadow_chrf.labels(model)
        for score in scores:
            child.observe(score)

    def observe_shadow_dropped(self, model: str, reason: str) -> None:
        self.shadow_dropped.labels(model, reason).inc()

    def observe_queue(self, model: str, depth: int) -> None:
        child = self._queue_depth_children.get(model)
        if child is None:
            child = self._queue_depth_children[model] = self.queue_depth.labels(model)
        child.set(depth)


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class MetricsMiddleware:
    """Pure ASGI middleware: counts every API request by route, model and status.

    Routes name the model they served in ``request.state.model`` (which lives in
    ``scope["state"]``); paths that are not API routes are counted as ``other``
    so random URLs cannot grow the label set.
    """

    def __init__(self, app: Callable, metrics: ServerMetrics, routes: set[str]):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in self.routes else "other"
        status = 500
        started = time.perf_counter()

        async def send_with_status(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_progress.inc()
        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self.metrics.in_progress.dec()
            model = scope.get("state", {}).get("model", NO_MODEL)
            self.metrics.observe_request(route, model, status, time.perf_counter() - started)
