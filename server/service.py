"""The work behind the routes, as plain functions: read and check a request, pick a model, translate.

Every client mistake becomes an :class:`ApiError` with its HTTP status; the app
turns it into ``{"error": "..."}``.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import json
import logging
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.types import Receive

from wdserve.server.batching import (
    Batcher,
    ClientGone,
    ClientWatch,
    DeadlineExceeded,
    QueueFull,
    SentenceResult,
)
from wdserve.server.confidence import confidence
from wdserve.server.detect import Detection, DetectionError, LanguageDetector
from wdserve.server.markup import HtmlDocument, MarkupError
from wdserve.server.metrics import ServerMetrics
from wdserve.server.models import ModelRegistry, ServedModel
from wdserve.server.protocol import BODY_DEADLINE_PASSED, CLIENT_WATCH
from wdserve.server.schemas import CompareRequest, TranslateRequest
from wdserve.server.settings import ServeSettings
from wdserve.server.text import TextError, check_text, join_sentences, split_sentences

if TYPE_CHECKING:
    from wdserve.server.cascade import Cascade
    from wdserve.server.shadow import Shadow

log = logging.getLogger(__name__)

RequestModel = TypeVar("RequestModel", bound=BaseModel)
T = TypeVar("T")

# nginx's status for "client closed request": counted in the metrics, never seen by a client
CLIENT_CLOSED_REQUEST = 499
CLOSE = {"Connection": "close"}  # the rest of the body is not read, so the connection cannot be reused


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


@dataclass
class ServerState:
    """Everything the routes need; built in the app's lifespan."""

    settings: ServeSettings
    registry: ModelRegistry
    executor: ThreadPoolExecutor
    metrics: ServerMetrics
    detector: LanguageDetector | None = None  # for source "auto" and /detect (server.detect)
    batchers: dict[str, Batcher] = field(default_factory=dict)
    cascades: dict[str, Cascade] = field(default_factory=dict)  # served cascades by name (server.cascade)
    shadow: Shadow | None = None  # shadow translations by the reference model (server.shadow), when on
    ready: bool = False


@dataclass
class Sentence:
    """One sentence of a request as translated: the model that wrote it and, when scores were asked
    for, that model's mean log-probability per output token (``server.confidence``)."""

    source: str
    text: str
    model: str
    tokens: int
    log_prob: float | None = None
    alternatives: list[str] = field(default_factory=list)  # the next best outputs, when asked for


@dataclass
class Translation:
    """A request's translated sentences, in order, and the texts they join back into.

    What only some requests read (per-text sentence lists, alternatives) is computed when read,
    so a plain request pays for its texts and nothing else.
    """

    model: str
    split: Split
    sentences: list[Sentence]  # every sentence of every text, in order
    total_ms: float
    queue_ms: float
    translate_ms: float

    @cached_property  # the response reads it, and alternatives() again
    def texts(self) -> list[str]:
        return self.split.join([sentence.text for sentence in self.sentences])

    def by_text(self) -> list[list[Sentence]]:
        """The sentences grouped per input text."""
        return self.split.per_text(self.sentences)

    def alternatives(self) -> list[list[str]]:
        """Per text, its other translations, best first: alternative k joins the sentences' k-th best
        outputs (a sentence's best where its list is shorter); alternatives equal to the translation or
        to each other are dropped."""
        sentences = self.sentences
        ranks = max((len(sentence.alternatives) for sentence in sentences), default=0)
        ranked = [self.split.join([sentence.alternatives[rank] if rank < len(sentence.alternatives)
                                   else sentence.text for sentence in sentences]) for rank in range(ranks)]
        return [list(dict.fromkeys(other for other in others if other != best))
                for best, *others in zip(self.texts, *ranked, strict=True)]

    def timing(self) -> dict[str, float]:
        return {"total_ms": round(self.total_ms, 3), "queue_ms": round(self.queue_ms, 3),
                "translate_ms": round(self.translate_ms, 3)}


# -- reading the request

def max_body_bytes(settings: ServeSettings) -> int:
    # worst case: every text at the limit, 4 UTF-8 bytes per character, JSON escaping x2, plus fields
    return settings.max_texts * settings.max_chars * 8 + 64 * 1024


async def receive_body(request: Request, limit: int) -> bytearray:
    """The whole body: 413 past ``limit`` bytes, 408 once its deadline passed, 499 if the client leaves.

    The deadline is kept by the connection (``server.protocol``), which marks the scope and
    wakes this loop, so a body that arrives in one piece costs no timer.
    """
    raw = bytearray()
    while True:
        message = await request.receive()
        if message["type"] != "http.request":
            log.debug("%s: client left before sending the whole body", request.url.path)
            raise ApiError(CLIENT_CLOSED_REQUEST, "the client closed the connection while sending the body")
        raw += message.get("body", b"")
        if len(raw) > limit:
            raise ApiError(413, f"request body is larger than the limit of {limit} bytes", CLOSE)
        if not message.get("more_body", False):
            return raw
        if BODY_DEADLINE_PASSED in request.scope:
            raise ApiError(408, f"the request body did not arrive within "
                                f"{request.scope[BODY_DEADLINE_PASSED]:g} s of its headers", CLOSE)


async def read_body(request: Request, limit: int) -> dict[str, Any]:
    """The body as a dict: JSON object, or form-encoded fields (LibreTranslate accepts both)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is {declared} bytes; the limit is {limit}", CLOSE)
    raw = await receive_body(request, limit)
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":  # what LibreTranslate's web frontend posts (FormData)
        return multipart_fields(bytes(raw), request.headers["content-type"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ApiError(400, f"request body is not valid UTF-8 (byte {err.start})") from err
    if content_type == "application/x-www-form-urlencoded":
        return form_fields(parse_qs(text, keep_blank_values=True))
    if content_type not in ("application/json", "") and not content_type.endswith("+json"):
        raise ApiError(415, f"content type {content_type!r} is not supported; send application/json")
    try:
        body = json.loads(text)
    except json.JSONDecodeError as err:
        raise ApiError(400, f"malformed JSON: {err.msg} at line {err.lineno} column {err.colno}") from err
    if not isinstance(body, dict):
        raise ApiError(422, f"the body must be a JSON object, not {type(body).__name__}")
    return body


def form_fields(fields: dict[str, list[str]]) -> dict[str, Any]:
    """A repeated q is a list of texts; any other repeated field keeps its last value."""
    return {key: values if key == "q" and len(values) > 1 else values[-1] for key, values in fields.items()}


def multipart_fields(raw: bytes, content_type: str) -> dict[str, Any]:
    """The text fields of a multipart/form-data body (parts that are files are not read)."""
    try:
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + raw)
        if not message.is_multipart():
            raise ApiError(400, "multipart/form-data body without its boundary")
        fields: dict[str, list[str]] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if isinstance(name, str) and part.get_filename() is None:
                payload = part.get_payload(decode=True) or b""
                fields.setdefault(name, []).append(payload.decode(part.get_content_charset() or "utf-8"))
    except (UnicodeError, LookupError, ValueError) as err:
        raise ApiError(400, f"unreadable multipart/form-data body: {err}") from err
    return form_fields(fields)


def check_api_key(body: dict[str, Any], request: Request, settings: ServeSettings) -> None:
    if not settings.api_keys:
        return
    key = body.get("api_key") or request.headers.get("x-api-key")
    if not isinstance(key, str) or not any(secrets.compare_digest(key.encode(), ok.encode())
                                           for ok in settings.api_keys):
        raise ApiError(403, "invalid or missing API key (give api_key in the body or an X-API-Key header)")


def parse(model: type[RequestModel], body: dict[str, Any]) -> RequestModel:
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise ApiError(422, describe_validation_errors(err.errors())) from err


def describe_validation_errors(errors: list[Any]) -> str:
    """pydantic/FastAPI error list -> one line, e.g. ``beam_size: Input should be a valid integer``."""
    parts = []
    for error in errors:
        loc = ".".join(str(part) for part in error.get("loc", ()) if part not in ("body", "str", "list[str]"))
        parts.append(f"{loc}: {error.get('msg')}" if loc else str(error.get("msg")))
    return "; ".join(dict.fromkeys(parts))


def check_texts(q: str | list[str], settings: ServeSettings) -> list[str]:
    texts = [q] if isinstance(q, str) else q
    if not texts:
        raise ApiError(422, "q: the list is empty")
    if len(texts) > settings.max_texts:
        raise ApiError(422, f"q: {len(texts)} texts; at most {settings.max_texts} per request")
    for index, text in enumerate(texts):
        try:
            check_text(text, settings.max_chars, "q" if isinstance(q, str) else f"q[{index}]")
        except TextError as err:
            raise ApiError(400, str(err)) from err
    return texts


def decoding_options(beam_size: int | None, max_length: int | None,
                     settings: ServeSettings) -> tuple[int, int]:
    beam = settings.default_beam_size if beam_size is None else beam_size
    length = settings.default_max_length if max_length is None else max_length
    if not 1 <= beam <= settings.max_beam_size:
        raise ApiError(422, f"beam_size: {beam} is out of range 1..{settings.max_beam_size}")
    if not 1 <= length <= settings.max_length_limit:
        raise ApiError(422, f"max_length: {length} is out of range 1..{settings.max_length_limit}")
    return beam, length


@dataclass(frozen=True)
class Job:
    """What to translate and how: the request's texts and decoding options, checked."""

    texts: list[str]
    beam_size: int
    max_length: int
    confidence: bool = False  # the request asked for confidence scores
    cascade_threshold: float | None = None  # overrides a cascade's threshold for this request
    alternatives: int = 0  # other translations to return from the n-best list
    documents: list[HtmlDocument] | None = None  # format "html": each text parsed (server.markup)

    @property
    def plain_texts(self) -> list[str]:
        """What a reader of the text sees: the texts, or the HTML documents' text nodes."""
        if self.documents is None:
            return self.texts
        return [node for document in self.documents for node in document.texts]


async def check_job(req: TranslateRequest | CompareRequest, settings: ServeSettings) -> Job:
    """The request's texts, then its decoding options, checked against the server's limits.

    HTML is parsed off the event loop: dense markup costs about 2 µs of CPU a character.
    """
    texts = check_texts(req.q, settings)
    beam_size, max_length = decoding_options(req.beam_size, req.max_length, settings)
    alternatives = getattr(req, "alternatives", 0)
    if not 0 <= alternatives <= settings.max_alternatives:
        raise ApiError(422, f"alternatives: {alternatives} is out of range 0..{settings.max_alternatives}")
    documents = None
    if req.format == "html":
        try:
            documents = await asyncio.to_thread(lambda: [HtmlDocument.parse(text) for text in texts])
        except MarkupError as err:
            raise ApiError(400, str(err)) from err
    return Job(texts, beam_size, max_length, getattr(req, "return_confidence", False),
               getattr(req, "cascade_threshold", None), alternatives, documents)


async def detect(state: ServerState, text: str) -> list[Detection]:
    """Every candidate language of ``text`` with its confidence, most likely first (server.detect)."""
    return await _detecting(state, lambda detector: detector.detect(text))


async def detect_source(state: ServerState, job: Job) -> Detection:
    """The served source language the job's texts are in, all together (HTML: its text nodes)."""
    text = "\n".join(job.plain_texts)
    return await _detecting(state, lambda detector: detector.detect_source(text))


async def _detecting(state: ServerState, call: Callable[[LanguageDetector], T]) -> T:
    if state.detector is None:
        raise ApiError(400, "language detection is not set up on this server; give source explicitly")
    try:  # a few ms for a long text: off the event loop
        return await asyncio.to_thread(call, state.detector)
    except DetectionError as err:
        raise ApiError(400, str(err)) from err


def choose_model(registry: ModelRegistry, settings: ServeSettings, name: str | None,
                 source: str, target: str | None) -> ServedModel:
    """The named model, or the default one, or any served model for the requested pair."""
    if name is not None:
        served = registry.resolve(name)
        if served is None:
            raise ApiError(400, f"unknown model {name!r}; served: {', '.join(registry.names())}")
        if not served.supports(source, target):
            raise ApiError(400, f"model {served.name!r} translates {served.source_lang} -> "
                                f"{served.target_lang}, not {source or 'any'} -> {target or 'any'}")
        return served
    default = registry.resolve(settings.default_model)
    # after the default: models an alias points at (the preferred variants), then the rest
    preferred = set(registry.aliases.values())
    others = sorted(registry.models.values(), key=lambda m: (m.name not in preferred, m.name))
    candidates = ([default] if default else []) + others
    for served in candidates:
        if served.supports(source, target):
            return served
    pairs = ", ".join(f"{s} -> {t}" for s, t in sorted(registry.pairs())) or "none"
    raise ApiError(400, f"no served model translates {source or 'any'} -> {target or 'any'}; "
                        f"served pairs: {pairs}")


# -- translating

class ReceiveWatch(ClientWatch):
    """A ClientWatch for any ASGI server: a task awaits ``receive()``, whose next message after the
    body is ``http.disconnect``, arriving when the client leaves (about 17 µs of CPU a request)."""

    __slots__ = ("task",)

    def __init__(self, receive: Receive) -> None:
        super().__init__()
        self.task = asyncio.ensure_future(receive())
        self.task.add_done_callback(self._received)

    def _received(self, task: asyncio.Future) -> None:
        if not task.cancelled():
            task.exception()  # retrieved: a receive() that failed means a lost client as well
            self.lost()

    def stop(self) -> None:
        self.task.cancel()


def client_watch(request: Request) -> ClientWatch:
    """How the batcher learns that this request's client left; ``stop()`` it when the request ends.

    ``wdserve serve``'s protocol keeps one per connection in the scope (``server.protocol``);
    under another ASGI server a task watches ``receive()``.
    """
    watch = request.scope.get(CLIENT_WATCH)
    return watch if watch is not None else ReceiveWatch(request.receive)


@dataclass
class Split:
    """A job's texts cut into sentences (``segments``, with the ``separators`` that join them back).

    For HTML the texts are the documents' text nodes, and joining renders each document with its
    nodes translated (``server.markup``).
    """

    texts: list[tuple[list[str], list[str]]]
    documents: list[HtmlDocument] | None = None

    @property
    def sentences(self) -> list[str]:
        return [sentence for segments, _ in self.texts for sentence in segments]

    def join(self, outputs: list[str]) -> list[str]:
        """One output per sentence, in order -> one text per input text."""
        it = iter(outputs)
        texts = [join_sentences([next(it) for _ in segments], separators)
                 for segments, separators in self.texts]
        if self.documents is None:
            return texts
        nodes = iter(texts)
        return [document.render([next(nodes) for _ in document.texts]) for document in self.documents]

    def per_text(self, items: list[Any]) -> list[list[Any]]:
        """One item per sentence, in order -> a list per input text."""
        it = iter(items)
        per_node = [[next(it) for _ in segments] for segments, _ in self.texts]
        if self.documents is None:
            return per_node
        nodes = iter(per_node)
        return [[item for _ in document.texts for item in next(nodes)] for document in self.documents]


def split_job(job: Job) -> Split:
    return Split([split_sentences(text) for text in job.plain_texts], job.documents)


def encode_sentences(served: ServedModel, sentences: list[str],
                     max_length: int) -> tuple[list[list[str]], int]:
    """Every sentence's source pieces for ``served``, and ``max_length`` held to its position table."""
    pieces = [served.encode(sentence) for sentence in sentences]
    if served.max_positions:
        # CTranslate2 fails a whole batch on a position past the model's table, so check per sentence
        for sentence_pieces in pieces:
            if len(sentence_pieces) + 1 > served.max_positions:
                raise ApiError(400, f"a sentence has {len(sentence_pieces)} tokens; model {served.name!r} "
                                    f"accepts at most {served.max_positions - 1} per sentence")
        max_length = min(max_length, served.max_positions)
    return pieces, max_length


async def translate_sentences(state: ServerState, served: ServedModel, pieces: list[list[str]], job: Job,
                              max_length: int, client: ClientWatch | None,
                              scores: bool) -> list[SentenceResult]:
    """Sentences through ``served``'s batcher; its refusals and failures become ApiErrors."""
    batcher = state.batchers[served.name]
    try:
        return await batcher.translate(pieces, job.beam_size, max_length, state.settings.request_timeout_s,
                                       client=client, scores=scores, num_hypotheses=job.alternatives + 1)
    except QueueFull as err:
        raise ApiError(503, str(err), {"Retry-After": str(err.retry_after_s)}) from err
    except DeadlineExceeded as err:
        raise ApiError(504, str(err)) from err
    except ClientGone as err:
        log.debug("%s: %s; its queued sentences were withdrawn", served.name, err)
        raise ApiError(CLIENT_CLOSED_REQUEST, str(err)) from err
    except Exception as err:  # the model failed (logged by the batcher); the server goes on
        raise ApiError(500, f"model {served.name!r} failed: {type(err).__name__}: {err}") from err


def assemble(model: str, split: Split, sentences: list[Sentence], started: float,
             results: list[SentenceResult]) -> Translation:
    """The translated sentences with the request's timing."""
    return Translation(
        model=model,
        split=split,
        sentences=sentences,
        total_ms=(time.perf_counter() - started) * 1000,
        queue_ms=max((result.queued_s for result in results), default=0.0) * 1000,
        translate_ms=max((result.compute_s for result in results), default=0.0) * 1000,
    )


async def translate(state: ServerState, served: ServedModel | Cascade, job: Job,
                    client: ClientWatch | None = None) -> Translation:
    """Splits every text into sentences, translates them all as one submission, joins them back.

    HTML documents are translated text node by text node, all their sentences in the same
    submission. Given the request's :func:`client_watch`, a client that disconnects while its
    sentences wait ends the request with 499 and withdraws them from the queue untranslated. A
    cascade (``server.cascade``) translates by its own rule (without alternatives).
    """
    if served.name in state.cascades:
        return await state.cascades[served.name].translate(state, job, client)
    started = time.perf_counter()
    split = split_job(job)
    sources = split.sentences
    pieces, max_length = encode_sentences(served, sources, job.max_length)
    results = await translate_sentences(state, served, pieces, job, max_length, client, job.confidence)
    if job.confidence:
        state.metrics.observe_confidence(served.name, [confidence(result.log_prob) for result in results])
    sentences = [Sentence(source, result.text, served.name, result.output_tokens, result.log_prob,
                          result.alternatives) for source, result in zip(sources, results, strict=True)]
    return assemble(served.name, split, sentences, started, results)


def start_batchers(state: ServerState) -> None:
    settings = state.settings
    for name, served in state.registry.models.items():
        batcher = Batcher(
            name, served.translate_texts, state.executor,
            max_batch_size=settings.max_batch_size, max_batch_tokens=settings.max_batch_tokens,
            max_wait_s=settings.max_wait_ms / 1000, queue_size=settings.queue_size,
            on_batch=state.metrics.observe_batch, on_queue=state.metrics.observe_queue,
            on_cancel=state.metrics.observe_cancelled)
        batcher.start()
        state.batchers[name] = batcher
