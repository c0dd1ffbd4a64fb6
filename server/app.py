"""The FastAPI app: ``create_app(settings)`` builds it; thin routes, typed dependencies, ``server.service``.

Run it with ``wdserve serve`` or, configured from ``WDSERVE_*`` variables only,
``uvicorn --factory wdserve.server.app:create_app``.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from wdserve.server import service
from wdserve.server.cascade import Cascade, build_cascades, choose_cascade
from wdserve.server.confidence import response_fields
from wdserve.server.detect import Detection, LanguageDetector
from wdserve.server.metrics import NO_MODEL, MetricsMiddleware, ServerMetrics
from wdserve.server.models import ModelRegistry, ServedModel, discover_workdir
from wdserve.server.schemas import (
    CompareRequest,
    CompareResponse,
    DetectedLanguage,
    DetectRequest,
    FrontendSettings,
    Health,
    Language,
    ModelInfo,
    Ready,
    TranslateRequest,
    TranslateResponse,
    error_responses,
)
from wdserve.server.service import ApiError, RequestModel, ServerState
from wdserve.server.settings import OutputLimit, ServeSettings, available_cores
from wdserve.server.shadow import build_shadow, reference_model

log = logging.getLogger(__name__)

LANGUAGE_NAMES = {
    "en": "English", "de": "German", "fr": "French", "es": "Spanish", "it": "Italian", "pt": "Portuguese",
    "nl": "Dutch", "cs": "Czech", "ru": "Russian", "zh": "Chinese", "ja": "Japanese", "ar": "Arabic",
    "xx": "Synthetic source", "yy": "Synthetic target", "auto": "Auto Detect",
}

API_ROUTES = {"/translate", "/translate/compare", "/detect", "/languages", "/models", "/frontend/settings",
              "/health", "/ready", "/metrics", "/"}
# the side-by-side page: plain HTML and JavaScript, served as it is (no build step, nothing from a CDN)
PAGE = Path(__file__).parent / "static" / "index.html"


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


def build_detector(registry: ModelRegistry, settings: ServeSettings) -> LanguageDetector:
    """Detection among the served languages and ``detect_languages`` (loads lingua's models for them)."""
    pairs = registry.pairs()
    return LanguageDetector({source for source, _ in pairs}, {target for _, target in pairs},
                            settings.detect_languages, settings.detect_screen_share)


def check_serving_plan(settings: ServeSettings, registry: ModelRegistry) -> None:
    """Raises ConfigError, before the server starts, when a cascade or the shadow reference names a model
    that is not served."""
    build_cascades(settings, registry)
    reference_model(settings, registry)


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
        state = ServerState(settings, loaded, executor, metrics, detector=build_detector(loaded, settings),
                            cascades=build_cascades(settings, loaded))
        service.start_batchers(state)
        state.shadow = build_shadow(settings, loaded, state.batchers, metrics)
        if state.shadow is not None:
            state.shadow.start()
        state.ready = True
        app.state.server = state
        log.info("serving %s (aliases: %s)", ", ".join(sorted(loaded.models)),
                 ", ".join(f"{a}->{t}" for a, t in sorted(loaded.aliases.items())) or "none")
        try:
            yield
        finally:
            # uvicorn gets here after in-flight requests finished (or graceful_timeout_s passed)
            state.ready = False
            if state.shadow is not None:
                await state.shadow.stop()
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
    add_routes(app, metrics, settings)

    def observe_unanswered(path: str, status: int, seconds: float) -> None:
        """Counts a request its connection ended before the app saw it (server.protocol: 408, 431, 499)."""
        metrics.observe_request(path if path in API_ROUTES else "other", NO_MODEL, status, seconds)

    app.state.observe_unanswered = observe_unanswered
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


# -- dependencies: the steps the routes share, each written once

async def get_state(request: Request) -> ServerState:
    """The loaded server; 503 with Retry-After until the lifespan has loaded every model."""
    state: ServerState | None = getattr(request.app.state, "server", None)
    if state is None or not state.ready:
        raise ApiError(503, "models are not loaded yet", {"Retry-After": "1"})
    return state


State = Annotated[ServerState, Depends(get_state)]


async def get_body(request: Request, state: State) -> dict[str, Any]:
    """The body's fields (JSON or form-encoded), read within the size limit, with a valid API key."""
    body = await service.read_body(request, service.max_body_bytes(state.settings))
    service.check_api_key(body, request, state.settings)
    return body


Body = Annotated[dict[str, Any], Depends(get_body)]


def parsed_body(model: type[RequestModel]) -> Any:
    """``Depends`` on the body parsed into ``model`` (422 naming the field when it does not fit)."""
    async def parse_body(body: Body) -> RequestModel:
        return service.parse(model, body)
    return Depends(parse_body)


TranslateBody = Annotated[TranslateRequest, parsed_body(TranslateRequest)]
CompareBody = Annotated[CompareRequest, parsed_body(CompareRequest)]
DetectBody = Annotated[DetectRequest, parsed_body(DetectRequest)]


@dataclass(frozen=True)
class AutoSource:
    """What source "auto" found: the language, and the checked job it was found in."""

    detection: Detection
    job: service.Job


async def get_detection(state: State, req: TranslateBody) -> AutoSource | None:
    """With source "auto", the language the texts are in (400 when it cannot be told or is not served).

    Only then are the texts checked before the model is chosen, and the route reuses that job:
    otherwise the model comes first, so that text errors count under it.
    """
    if req.source != "auto":
        return None
    job = await service.check_job(req, state.settings)
    return AutoSource(await service.detect_source(state, job), job)


Detected = Annotated[AutoSource | None, Depends(get_detection)]


async def get_model(request: Request, state: State, req: TranslateBody,
                    detected: Detected) -> ServedModel | Cascade:
    """The model (or cascade) that translates the request, named in ``request.state`` for the metrics."""
    source = detected.detection.language if detected is not None else req.source
    served = choose_cascade(state, req.model, source, req.target) or service.choose_model(
        state.registry, state.settings, req.model, source, req.target)
    request.state.model = served.name
    return served


ChosenModel = Annotated[ServedModel | Cascade, Depends(get_model)]


async def get_compared_models(request: Request, state: State, req: CompareBody) -> list[ServedModel]:
    """The two models to compare (default: the server's compare_models), named for the metrics."""
    models = [service.choose_model(state.registry, state.settings, name, req.source, req.target)
              for name in req.models or state.settings.compare_models]
    request.state.model = "|".join(served.name for served in models)
    return models


ComparedModels = Annotated[list[ServedModel], Depends(get_compared_models)]


# -- the translation routes: FastAPI's reference and dependencies, without its per-request overhead

class PlainRoute(APIRoute):
    """An APIRoute whose dependencies are solved here, in a few lines, instead of by FastAPI.

    FastAPI documents the route (``response_model``, ``responses``, ``openapi_extra``) and
    builds its dependency tree as usual. Per request, though, its handler costs about 19 µs
    and its solver about 8 µs per node of the tree (which revisits shared dependencies), so
    with these routes' dependencies the app's own CPU per request nearly tripled (48 -> 136 µs
    in-process); solved here it is 52 µs. The endpoint gets its dependencies awaited in FastAPI's
    order (depth first, each once per request) and returns a finished Response, which needs no
    re-validation (the tests check the bodies against the models). Only async dependencies of
    the Request and of each other are solved; a route declaring anything else fails when the
    app is built. While ``app.dependency_overrides`` is set, requests take FastAPI's handler.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        fastapi_handler = super().get_route_handler()
        solve = _plain_solver(self.dependant, self.path)
        endpoint, overridable = self.endpoint, self.dependency_overrides_provider

        async def handle(request: Request) -> Response:
            if overridable is not None and overridable.dependency_overrides:
                return await fastapi_handler(request)
            return await endpoint(**await solve(request, {}))

        return handle


Solver = Callable[[Request, dict[Any, Any]], Coroutine[Any, Any, dict[str, Any]]]


def _plain_solver(dependant: Dependant, path: str) -> Solver:
    """The keyword arguments for ``dependant.call``: its Request and its dependencies' results."""
    name = getattr(dependant.call, "__qualname__", dependant.call)
    unsupported = [kind for kind, params in (
        ("path", dependant.path_params), ("query", dependant.query_params),
        ("header", dependant.header_params), ("cookie", dependant.cookie_params),
        ("body", dependant.body_params)) if params]
    unsupported += [param for param in ("websocket_param_name", "http_connection_param_name",
                                        "response_param_name", "background_tasks_param_name",
                                        "security_scopes_param_name") if getattr(dependant, param)]
    if unsupported:
        raise TypeError(f"PlainRoute {path}: {name} takes {', '.join(unsupported)} parameters; "
                        f"only the Request and Depends(async function) are solved")
    for sub in dependant.dependencies:
        if not inspect.iscoroutinefunction(sub.call):
            raise TypeError(f"PlainRoute {path}: dependency {sub.call!r} must be an async function "
                            f"without yield")
    subs = [(sub.name, sub.call, sub.use_cache, _plain_solver(sub, path)) for sub in dependant.dependencies]
    request_name = dependant.request_param_name

    async def solve(request: Request, solved: dict[Any, Any]) -> dict[str, Any]:
        values: dict[str, Any] = {request_name: request} if request_name else {}
        for sub_name, call, use_cache, solve_sub in subs:
            if use_cache and call in solved:
                values[sub_name] = solved[call]
            else:
                values[sub_name] = solved[call] = await call(**await solve_sub(request, solved))
        return values

    return solve


def _json(content: Any) -> Response:
    """A body already shaped like its route's ``response_model``, rendered once."""
    return Response(json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode(),
                    media_type="application/json")


def add_routes(app: FastAPI, metrics: ServerMetrics, settings: ServeSettings) -> None:
    def translation_route(path: str, **options: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """``@app.post`` for a PlainRoute, on the app's own router (an included one costs a second match)."""
        def register(endpoint: Callable[..., Any]) -> Callable[..., Any]:
            app.router.add_api_route(path, endpoint, methods=["POST"], route_class_override=PlainRoute,
                                     responses=error_responses(400, 403, 408, 413, 415, 422, 503, 504),
                                     tags=["translate"], **options)
            return endpoint
        return register

    @translation_route("/translate", response_model=TranslateResponse, response_model_exclude_none=True,
                       openapi_extra=_request_body(TranslateRequest))
    async def translate(request: Request, req: TranslateBody, served: ChosenModel, detected: Detected,
                        state: State) -> Response:
        """Translates `q` (a string or a list of strings); LibreTranslate's request and response shape.

        Text with several sentences is split into sentences, translated as one batch and
        joined back; `format: html` translates the text nodes and keeps the markup. Also accepts
        form-encoded and multipart bodies, as LibreTranslate does. A client that disconnects
        while waiting withdraws its sentences (counted as status 499).
        """
        job = detected.job if detected is not None else await service.check_job(req, state.settings)
        client = service.client_watch(request)
        try:
            result = await service.translate(state, served, job, client)
        finally:
            client.stop()
        one = isinstance(req.q, str)
        response: dict[str, Any] = {
            "translatedText": result.texts[0] if one else result.texts,
            "model": result.model, "timing": result.timing()}
        if detected is not None:  # one language for the request, repeated per text as LibreTranslate does
            found = detected.detection.as_json()
            response["detectedLanguage"] = found if one else [found] * len(job.texts)
        if job.alternatives:
            alternatives = result.alternatives()
            response["alternatives"] = alternatives[0] if one else alternatives
        response.update(response_fields(result, one, job.confidence,
                                        job.confidence or isinstance(served, Cascade)))
        if state.shadow is not None:
            state.shadow.offer(served, job, result)
        return _json(response)

    @translation_route("/detect", response_model=list[DetectedLanguage],
                       openapi_extra=_request_body(DetectRequest))
    async def detect(req: DetectBody, state: State) -> Response:
        """The language of `q` (LibreTranslate's shape): every language the server weighs, most likely first.

        Candidates are the served languages lingua knows plus the `detect_languages` setting;
        confidence is 0-100, relative to them. 400 when no served language is detectable.
        """
        detections = await service.detect(state, service.check_texts(req.q, state.settings)[0])
        return _json([detection.as_json() for detection in detections])

    @translation_route("/translate/compare", response_model=CompareResponse,
                       openapi_extra=_request_body(CompareRequest))
    async def compare(request: Request, req: CompareBody, models: ComparedModels, state: State) -> Response:
        """Translates the same input with two models (default: teacher and student), one after the other.

        Each result carries its own timing; the models run in turn so their times are comparable.
        """
        job = await service.check_job(req, state.settings)
        client = service.client_watch(request)
        results = []
        try:
            for served in models:
                result = await service.translate(state, served, job, client)
                texts = result.texts[0] if isinstance(req.q, str) else result.texts
                results.append({"model": result.model, "timing": result.timing(), "translatedText": texts})
        finally:
            client.stop()
        return _json({"results": results})

    @app.get("/languages", response_model=list[Language], responses=error_responses(503), tags=["info"])
    async def languages(state: State) -> list[dict[str, Any]]:
        """Source languages with their targets (LibreTranslate's shape)."""
        targets: dict[str, set[str]] = {}
        for source, target in state.registry.pairs():
            targets.setdefault(source, set()).add(target)
        return [{"code": code, "name": LANGUAGE_NAMES.get(code, code), "targets": sorted(targets[code])}
                for code in sorted(targets)]

    @app.get("/frontend/settings", response_model=FrontendSettings, responses=error_responses(503),
             tags=["info"])
    async def frontend_settings(state: State) -> dict[str, Any]:
        """What LibreTranslate's web frontend reads first: limits, whether a key is needed, its languages."""
        registry = state.registry
        default = registry.resolve(state.settings.default_model) or next(iter(registry.models.values()))
        detector = state.detector
        source = "auto" if detector is not None and detector.available else default.source_lang or "auto"
        target = default.target_lang or ""
        return {"charLimit": state.settings.max_chars, "frontendTimeout": 500,
                "apiKeys": bool(state.settings.api_keys), "keyRequired": bool(state.settings.api_keys),
                "suggestions": False, "filesTranslation": False, "supportedFilesFormat": [],
                "language": {"source": {"code": source, "name": LANGUAGE_NAMES.get(source, source)},
                             "target": {"code": target, "name": LANGUAGE_NAMES.get(target, target)}}}

    page = PAGE.read_text(encoding="utf-8").replace("__COMPARE_MODELS__", json.dumps(settings.compare_models))

    @app.get("/", response_class=HTMLResponse, tags=["info"])
    async def side_by_side() -> HTMLResponse:
        """A page comparing two models in the browser: both translations, their latency and the speed-up."""
        return HTMLResponse(page)

    @app.get("/models", response_model=list[ModelInfo], responses=error_responses(503), tags=["info"])
    async def models(state: State) -> list[dict[str, Any]]:
        """Every served model: name, aliases, language pair, method, quantization, parameter count; then
        every cascade; with shadowing on, each covered model's agreement with the reference."""
        default = state.registry.resolve(state.settings.default_model)
        shadow = state.shadow.describe if state.shadow is not None else lambda name: None
        return [{**served.describe(), "aliases": state.registry.aliases_of(name),
                 "default": default is not None and default.name == name, "shadow": shadow(name)}
                for name, served in sorted(state.registry.models.items())] + [
                {**cascade.describe(), "aliases": [], "default": name == state.settings.default_model}
                for name, cascade in sorted(state.cascades.items())]

    @app.get("/health", response_model=Health, tags=["operations"])
    async def health() -> dict[str, str]:
        """Liveness: the process answers HTTP."""
        return {"status": "alive"}

    @app.get("/ready", response_model=Ready, responses=error_responses(503), tags=["operations"])
    async def ready(state: State) -> dict[str, Any]:
        """Readiness: every model is loaded and its batcher runs."""
        return {"status": "ready", "models": sorted(state.registry.models)}

    @app.get("/metrics", response_class=Response, tags=["operations"],
             responses={200: {"content": {CONTENT_TYPE_LATEST: {}},
                              "description": "Prometheus text format"}})
    async def prometheus_metrics() -> Response:
        """Prometheus metrics: requests and errors by route/model/status, latency, batch sizes, queue depth,
        tokens per second."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
