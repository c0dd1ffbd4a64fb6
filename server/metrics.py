"""Prometheus metrics, one registry per app (tests create many apps in one process)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from wdserve.server.batching import BatchStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
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
