"""Request and response bodies; they double as the OpenAPI reference.

``TranslateRequest`` is LibreTranslate's ``/translate`` body (q, source, target,
format, alternatives, api_key) plus wdserve's model, beam_size and max_length; unknown
fields (the web frontend's ``secret``) are ignored so existing clients work unchanged.
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
    source: str | None = Field(
        None, description="source language code; 'auto' detects it among the served languages (all texts "
                          "together); absent: the chosen model's source")
    target: str | None = Field(None, description="target language code (default: the model's target)")
    format: Literal["text", "html"] = Field(
        "text", description="'html': translate the text between tags, keep tags, attributes and entities")
    alternatives: Int = Field(
        0, description="how many other translations to add from the model's n-best list (at most the "
                       "server's max_alternatives; fewer when some are the same text)")
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
    source: str | None = Field(None, description="source language code ('auto' is not detected here)")
    target: str | None = None
    format: Literal["text", "html"] = "text"
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
    confidence: float = Field(description="0-100, relative to the other languages the server weighs")
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
    detectedLanguage: DetectedLanguage | list[DetectedLanguage] | None = Field(  # noqa: N815
        None, description="present when source was 'auto': the detected language (one per text when q is a "
                          "list)")
    alternatives: list[str] | list[list[str]] | None = Field(
        None, description="present when alternatives > 0: other translations, best first (one list per text "
                          "when q is a list)")
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


class DetectRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [{"q": "Guten Morgen!"}]})

    q: str = Field(description="text whose language to detect")
    api_key: str | None = None


class FrontendLanguage(BaseModel):
    code: str
    name: str


class FrontendLanguages(BaseModel):
    source: FrontendLanguage
    target: FrontendLanguage


class FrontendSettings(BaseModel):
    """What LibreTranslate's web frontend reads at start-up."""

    charLimit: int = Field(description="most characters in one text")  # noqa: N815
    frontendTimeout: int = Field(description="milliseconds the frontend waits after typing")  # noqa: N815
    apiKeys: bool  # noqa: N815
    keyRequired: bool  # noqa: N815
    suggestions: bool
    filesTranslation: bool  # noqa: N815
    supportedFilesFormat: list[str]  # noqa: N815
    language: FrontendLanguages


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
    bleu: float | None = Field(None, description="test BLEU recorded in its model.json, when there is one")
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
             "invalid UTF-8), HTML the parser cannot read, unknown model or unsupported language pair, "
             "a language detection cannot tell or no served model reads",
        403: "API keys are configured and the request's api_key is missing or wrong",
        408: "the request body did not arrive within the server's body deadline (the connection is closed)",
        413: "request body larger than the server accepts",
        415: "body is neither JSON nor form-encoded (urlencoded or multipart)",
        422: "a field has the wrong type or is out of range (too many texts, beam_size, max_length, "
             "alternatives)",
        503: "the model's queue is full (see Retry-After), the server is not ready, or it has as many "
             "connections and requests as it takes (plain-text body from uvicorn)",
        504: "the request waited longer than the server's request timeout",
    }
    return {status: {"model": ErrorResponse, "description": descriptions[status]} for status in statuses}
