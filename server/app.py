"""The FastAPI app: ``create_app(settings)`` builds it; routes stay thin and call ``server.service``.

Run it with ``wdserve serve`` or, configured from ``WDSERVE_*`` variables only,
``uvicorn --factory server.app:create_app``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from wdserve.server import service
from wdserve.server.metrics import MetricsMiddleware, ServerMetrics
from wdserve.server.models import ModelRegistry, discover_workdir
from wdserve.server.schemas import (
    CompareRequest,
    CompareResponse,
    Health,
    Language,
    ModelInfo,
    Ready,
    TranslateRequest,
    TranslateResponse,
    error_responses,
)
from wdserve.server.service import ApiError, ServerState
from wdserve.server.settings import OutputLimit, ServeSettings, available_cores

log = logging.getLogger(__name__)

LANGUAGE_NAMES = {
    "en": "English", "de": "German", "fr": "French", "es": "Spanish", "it": "Italian", "pt": "Portuguese",
    "nl": "Dutch", "cs": "Czech", "ru": "Russian", "zh": "Chinese", "ja": "Japanese", "ar": "Arabic",
    "xx": "Synthetic source", "yy": "Synthetic target",
}

API_ROUTES = {"/translate", "/translate/compare", "/languages", "/models", "/health", "/ready", "/metrics"}


def model_specs(settings: ServeSettings) -> dict[str, Any]:
    """Every directory to load, by served name: the workdir's exports plus explicit --model entries."""
    specs: dict[str, Any] = dict(discover_workdir(settings.workdir)) if settings.workdir else {}
    specs.update(settings.models)
    return specs


def load_registry(settings: ServeSettings) -> ModelRegistry:
    """Loads every model with threads planned so the cores are not oversubscribed (raises ModelLoadError)."""
    specs = model_specs(settings)
    inter, intra = settings.thread_plan(len(specs))
    if inter * intra > available_cores():
        log.warning("inter_threads x intra_threads = %d x %d exceeds the %d available cores",
                    inter, intra, available_cores())
    limit = OutputLimit(settings.output_length_ratio, settings.output_length_margin)
    return ModelRegistry.load(specs, settings.device, settings.compute_type, intra,
                              settings.prefer_quantization, limit)


def _request_body(model: type) -> dict[str, Any]:
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": schema},
        "application/x-www-form-urlencoded": {"schema": schema},
    }}}


def create_app(settings: ServeSettings | None = None, registry: ModelRegistry | None = None) -> FastAPI:
    """Builds the app. Models load in the lifespan unless an already loaded ``registry`` is given."""
    settings = settings or ServeSettings()
    metrics = ServerMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = registry or load_registry(settings)
        inter, _ = settings.thread_plan(len(loaded.models))
        executor = ThreadPoolExecutor(max_workers=inter, thread_name_prefix="translate")
        state = ServerState(settings, loaded, executor, metrics)
        service.start_batchers(state)
        state.ready = True
        app.state.server = state
        log.info("serving %s (aliases: %s)", ", ".join(sorted(loaded.models)),
                 ", ".join(f"{a}->{t}" for a, t in sorted(loaded.aliases.items())) or "none")
        try:
            yield
        finally:
            # uvicorn gets here after in-flight requests finished (or graceful_timeout_s passed)
            state.ready = False
            for batcher in state.batchers.values():
                await batcher.stop()
            executor.shutdown(wait=True)
            if registry is None:  # the caller owns a registry it passed in
                loaded.close()

    app = FastAPI(
        title="wdserve",
        summary="Teacher and weight-distilled student translation models, served side by side",
        description="LibreTranslate-compatible `/translate` plus model comparison, served by CTranslate2 "
                    "with dynamic batching. Every error is `{\"error\": \"...\"}`.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=API_ROUTES)
    add_error_handlers(app)
    add_routes(app, metrics)
    return app


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse({"error": err.message}, status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        message = service.describe_validation_errors(list(err.errors()))
        return JSONResponse({"error": message}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(err.detail)}, status_code=err.status_code, headers=err.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"error": f"internal server error ({type(err).__name__})"}, status_code=500)


class PlainRoute(APIRoute):
    """A route documented like any APIRoute but called like a plain Starlette route.

    Its endpoint takes the Request, does its own parsing and checking (``server.service``)
    and returns a finished Response, so FastAPI's per-request dependency solving and
    response re-validation have nothing to add; skipping them is a large share of the
    server's own CPU per request. The OpenAPI reference still comes from ``response_model``,
    ``responses`` and ``openapi_extra``, and the tests check bodies against the models.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        return self.endpoint


def _json(content: Any) -> Response:
    """A body already shaped like its route's ``response_model``, rendered once."""
    return Response(json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode(),
                    media_type="application/json")


def _state(request: Request) -> ServerState:
    state: ServerState | None = getattr(request.app.state, "server", None)
    if state is None or not state.ready:
        raise ApiError(503, "models are not loaded yet", {"Retry-After": "1"})
    return state


def add_routes(app: FastAPI, metrics: ServerMetrics) -> None:
    def plain_post(path: str, **options: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """``@app.post`` for a PlainRoute, on the app's own router (an included one costs a second match)."""
        def register(endpoint: Callable[..., Any]) -> Callable[..., Any]:
            app.router.add_api_route(path, endpoint, methods=["POST"], route_class_override=PlainRoute,
                                     **options)
            return endpoint
        return register

    @plain_post("/translate", response_model=TranslateResponse, response_model_exclude_none=True,
                openapi_extra=_request_body(TranslateRequest),
                responses=error_responses(400, 403, 413, 415, 422, 503, 504), tags=["translate"])
    async def translate(request: Request) -> Response:
        """Translates `q` (a string or a list of strings); LibreTranslate's request and response shape.

        Text with several sentences is split into sentences, translated as one batch and
        joined back. Also accepts form-encoded bodies, as LibreTranslate does.
        """
        state = _state(request)
        body = await service.read_body(request, service.max_body_bytes(state.settings))
        service.check_api_key(body, request, state.settings)
        req = service.parse(TranslateRequest, body)
        served = service.choose_model(state.registry, state.settings, req.model, req.source, req.target)
        request.state.model = served.name
        texts = service.check_texts(req.q, state.settings)
        beam, length = service.decoding_options(req.beam_size, req.max_length, state.settings)
        result = await service.translate(state, served, texts, beam, length)
        response: dict[str, Any] = {
            "translatedText": result.texts[0] if isinstance(req.q, str) else result.texts,
            "model": result.model, "timing": result.timing()}
        if req.source == "auto" and served.source_lang:
            response["detectedLanguage"] = {"confidence": 100.0, "language": served.source_lang}
        return _json(response)

    @plain_post("/translate/compare", response_model=CompareResponse,
                openapi_extra=_request_body(CompareRequest),
                responses=error_responses(400, 403, 413, 415, 422, 503, 504), tags=["translate"])
    async def compare(request: Request) -> Response:
        """Translates the same input with two models (default: teacher and student), one after the other.

        Each result carries its own timing; the models run in turn so their times are comparable.
        """
        state = _state(request)
        body = await service.read_body(request, service.max_body_bytes(state.settings))
        service.check_api_key(body, request, state.settings)
        req = service.parse(CompareRequest, body)
        names = req.models or state.settings.compare_models
        models = [service.choose_model(state.registry, state.settings, name, req.source, req.target)
                  for name in names]
        request.state.model = "|".join(served.name for served in models)
        texts = service.check_texts(req.q, state.settings)
        beam, length = service.decoding_options(req.beam_size, req.max_length, state.settings)
        results = []
        for served in models:
            result = await service.translate(state, served, texts, beam, length)
            results.append({"model": result.model, "timing": result.timing(),
                            "translatedText": result.texts[0] if isinstance(req.q, str) else result.texts})
        return _json({"results": results})

    @app.get("/languages", response_model=list[Language], responses=error_responses(503), tags=["info"])
    async def languages(request: Request) -> list[dict[str, Any]]:
        """Source languages with their targets (LibreTranslate's shape)."""
        targets: dict[str, set[str]] = {}
        for source, target in _state(request).registry.pairs():
            targets.setdefault(source, set()).add(target)
        return [{"code": code, "name": LANGUAGE_NAMES.get(code, code), "targets": sorted(targets[code])}
                for code in sorted(targets)]

    @app.get("/models", response_model=list[ModelInfo], responses=error_responses(503), tags=["info"])
    async def models(request: Request) -> list[dict[str, Any]]:
        """Every served model: name, aliases, language pair, method, quantization, parameter count."""
        state = _state(request)
        default = state.registry.resolve(state.settings.default_model)
        return [{**served.describe(), "aliases": state.registry.aliases_of(name),
                 "default": default is not None and default.name == name}
                for name, served in sorted(state.registry.models.items())]

    @app.get("/health", response_model=Health, tags=["operations"])
    async def health() -> dict[str, str]:
        """Liveness: the process answers HTTP."""
        return {"status": "alive"}

    @app.get("/ready", response_model=Ready, responses=error_responses(503), tags=["operations"])
    async def ready(request: Request) -> dict[str, Any]:
        """Readiness: every model is loaded and its batcher runs."""
        state = _state(request)
        return {"status": "ready", "models": sorted(state.registry.models)}

    @app.get("/metrics", response_class=Response, tags=["operations"],
             responses={200: {"content": {CONTENT_TYPE_LATEST: {}},
                              "description": "Prometheus text format"}})
    async def prometheus_metrics() -> Response:
        """Prometheus metrics: requests and errors by route/model/status, latency, batch sizes, queue depth,
        tokens per second."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
