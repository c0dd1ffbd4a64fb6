"""Request and response bodies; they double as the OpenAPI reference.

``TranslateRequest`` is LibreTranslate's ``/translate`` body (q, source, target,
format, api_key) plus wdserve's model, beam_size and max_length; unknown fields
(LibreTranslate's ``alternatives``) are ignored so existing clients work unchanged.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


def _no_bool(value: Any) -> Any:
    # JSON true would otherwise pass as the integer 1
    if isinstance(value, bool):
        raise ValueError("expected an integer, got a boolean")
    return value


Int = Annotated[int, BeforeValidator(_no_bool)]


class ErrorResponse(BaseModel):
    error: str = Field(description="what was wrong, in words a client can act on")


class TranslateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", json_schema_extra={
        "examples": [{"q": "Hello world. How are you?", "source": "en", "target": "de"}]})

    q: str | list[str] = Field(description="text, or a list of texts translated together")
    source: str = Field("auto", description="source language code, or 'auto' for the model's source")
    target: str | None = Field(None, description="target language code (default: the model's target)")
    format: Literal["text"] = Field("text", description="only plain text is supported")
    api_key: str | None = Field(None, description="required when the server has API keys configured")
    model: str | None = Field(None, description="served model name or alias (teacher, student, ...)")
    beam_size: Int | None = Field(None, description="beam width (1 = greedy); server default when absent")
    max_length: Int | None = Field(None, description="most output tokens per sentence")
    return_confidence: bool = Field(
        False, description="add `confidence` (per text) and `sentences` (per sentence: text, model, "
                           "confidence): the model's geometric-mean token probability, 0-1")
    cascade_threshold: float | None = Field(
        None, ge=0, le=1, description="for a cascade: re-translate sentences below this student confidence "
                                      "(default: the server's cascade_threshold)")


class CompareRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", json_schema_extra={
        "examples": [{"q": "Hello world.", "models": ["teacher", "student"]}]})

    q: str | list[str]
    source: str = "auto"
    target: str | None = None
    format: Literal["text"] = "text"
    api_key: str | None = None
    models: list[str] | None = Field(
        None, min_length=2, max_length=2, description="the two models (default: the server's compare_models)")
    beam_size: Int | None = None
    max_length: Int | None = None


class Timing(BaseModel):
    total_ms: float = Field(description="time in the server for this model's part of the request")
    queue_ms: float = Field(description="longest wait of one of its sentences before its batch started")
    translate_ms: float = Field(description="longest translate_batch call one of its sentences was in")


class DetectedLanguage(BaseModel):
    confidence: float
    language: str


class SentenceDetails(BaseModel):
    translatedText: str  # noqa: N815
    model: str = Field(description="the served model that wrote this sentence (for a cascade: its student "
                                   "or its teacher)")
    confidence: float | None = Field(None, description="that model's confidence in it, 0-1, when asked for")


class TranslateResponse(BaseModel):
    translatedText: str | list[str] = Field(description="a string or a list, matching q")  # noqa: N815
    model: str = Field(description="the served model that translated (aliases resolved)")
    timing: Timing
    detectedLanguage: DetectedLanguage | None = Field(  # noqa: N815
        None, description="present when source was 'auto' (the model's source language)")
    confidence: float | list[float] | None = Field(
        None, description="with return_confidence: per text, the geometric-mean probability the model(s) "
                          "gave their own output tokens (token-weighted over its sentences), matching q")
    sentences: list[SentenceDetails] | list[list[SentenceDetails]] | None = Field(
        None, description="with return_confidence, and always from a cascade: each sentence with its model "
                          "(and confidence), matching q")


class CompareResult(BaseModel):
    model: str
    translatedText: str | list[str]  # noqa: N815
    timing: Timing


class CompareResponse(BaseModel):
    results: list[CompareResult] = Field(description="one entry per model, in request order")


class Language(BaseModel):
    code: str
    name: str
    targets: list[str]


class CascadeInfo(BaseModel):
    student: str
    teacher: str
    threshold: float


class ShadowInfo(BaseModel):
    reference: str = Field(description="the model shadow requests went to")
    rate: float = Field(description="fraction of this model's requests shadowed")
    sentences: int = Field(description="sentences compared so far")
    mean_chrf: float | None = Field(description="mean sentence chrF against the reference, 0-100")
    identical: float | None = Field(description="share of sentences identical to the reference's")
    dropped_requests: int = Field(description="shadow requests dropped under load")


class ModelInfo(BaseModel):
    name: str
    aliases: list[str]
    source_lang: str | None
    target_lang: str | None
    method: str | None
    quantization: str | None
    parameters: int | None
    path: str | None = Field(description="the model directory (none for a cascade)")
    default: bool = Field(description="used when a request names no model")
    cascade: CascadeInfo | None = Field(None, description="a cascade's student, teacher and threshold")
    shadow: ShadowInfo | None = Field(
        None, description="agreement with the shadow reference so far, when shadowing covers this model")


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    models: list[str]


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the error statuses a route can answer."""
    descriptions = {
        400: "malformed JSON, invalid text (empty, over the character limit, control characters, "
             "invalid UTF-8), unknown model or unsupported language pair",
        403: "API keys are configured and the request's api_key is missing or wrong",
        408: "the request body did not arrive within the server's body deadline (the connection is closed)",
        413: "request body larger than the server accepts",
        415: "body is neither JSON nor form-encoded",
        422: "a field has the wrong type or is out of range (too many texts, beam_size, max_length)",
        503: "the model's queue is full (see Retry-After), the server is not ready, or it has as many "
             "connections and requests as it takes (plain-text body from uvicorn)",
        504: "the request waited longer than the server's request timeout",
    }
    return {status: {"model": ErrorResponse, "description": descriptions[status]} for status in statuses}
