"""Server settings: one object, filled from flags, ``WDSERVE_*`` environment variables or defaults.

Precedence is flag > environment > default, so a container is configured with
environment variables alone (``WDSERVE_WORKDIR=/run WDSERVE_API_KEYS=k1,k2``).
List- and map-valued settings accept a comma-separated string in the environment
(``WDSERVE_MODELS=teacher=/m/t,student=/m/s``) as well as JSON.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from wdserve.artifacts import DEFAULT_MAX_LENGTH, OutputLimit
from wdserve.server.detect import lingua_language

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "QUOTA PERIOD" or "max PERIOD"
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")  # -1 = no limit
CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def cgroup_cpu_limit() -> float | None:
    """The CPU quota of this process's container in cores (``docker --cpus``, a Kubernetes CPU
    limit), or None where there is none or the file cannot be read."""
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(CGROUP_V1_QUOTA.read_text())
        return None if quota_us <= 0 else quota_us / int(CGROUP_V1_PERIOD.read_text())
    except (OSError, ValueError):
        return None


def available_cores() -> int:
    """CPU cores this process may use: the cores it may run on (affinity, cpusets), fewer when a
    container's CPU quota allows less. A 2-CPU limit on a 64-core node is 2, not 64: threads
    beyond the quota only wait for their turn and stretch every batch."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, math.ceil(limit))
    return max(1, cores)


def _specs_from_text(value: Any, separator: str, parse: Any) -> Any:
    """A map-valued setting from the environment: a JSON object, or specs joined by ``separator``."""
    if not isinstance(value, str):
        return value
    value = value.strip()
    if value.startswith("{"):
        return json.loads(value)
    return parse([part for part in value.split(separator) if part.strip()])


class ServeSettings(BaseSettings):
    """Every knob of ``wdserve serve``. Field descriptions double as ``--help`` text and README table."""

    model_config = SettingsConfigDict(env_prefix="WDSERVE_", extra="forbid")

    # -- what to serve
    workdir: Path | None = Field(
        None, description="pipeline run directory; serves every DIR/export/*/model.json")
    models: Annotated[dict[str, Path], NoDecode] = Field(
        default_factory=dict, description="extra models as NAME=PATH (CTranslate2 dirs), comma-separated")
    default_model: str = Field("student", description="model used when a request names none")
    compare_models: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["teacher", "student"],
        description="the two models /translate/compare uses by default")
    prefer_quantization: str = Field(
        "int8", description="quantization the short alias (teacher, student) points at when several exist")
    cascades: Annotated[dict[str, list[str]], NoDecode] = Field(
        default_factory=dict,
        description="cascades as NAME=STUDENT,TEACHER: the student translates, the teacher re-translates the "
                    "sentences whose confidence is below cascade_threshold (several: ';'-separated)")
    cascade_threshold: float = Field(
        0.5, ge=0, le=1,
        description="a cascade's sentence with a lower student confidence goes to the teacher")

    # -- shadow translations by a reference model, off the user's path
    shadow_rate: float = Field(
        0.0, ge=0, le=1,
        description="fraction of requests to other models also translated by shadow_model in the "
                    "background, agreement (chrF) exported; 0 = off")
    shadow_model: str = Field("teacher", description="the reference model of shadow translations")
    shadow_queue_size: int = Field(
        64, ge=1, description="shadow requests waiting for the reference; more are dropped")

    # -- network
    host: str = Field("127.0.0.1", description="interface to bind (0.0.0.0 in a container)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="accepted API keys, comma-separated; empty = no key required")
    graceful_timeout_s: float = Field(
        30.0, gt=0, description="on SIGTERM, how long in-flight requests may take to finish")

    # -- connections: what a client may hold, and for how long
    limit_concurrency: int = Field(
        4096, ge=1, description="open connections plus in-flight requests beyond which a new request gets "
                                "503 at once (uvicorn's limit_concurrency)")
    keep_alive_timeout_s: float = Field(
        5.0, gt=0, description="an idle keep-alive connection is closed after this long (uvicorn's "
                               "timeout_keep_alive)")
    header_timeout_s: float = Field(
        10.0, gt=0, description="a connection is closed when a request's line and headers are not complete "
                                "this long after it opened (first request) or after their first bytes came")
    max_header_bytes: int = Field(
        16384, ge=1024, description="most bytes of request line plus headers; more gets 431 and a close")
    body_timeout_s: float = Field(
        20.0, gt=0, description="a request body not received in full this long after its headers gets 408 "
                                "and a close")

    # -- CTranslate2
    device: str = Field("cpu", description="cpu, cuda or auto")
    compute_type: str = Field("default", description="CTranslate2 compute type (default keeps the export's)")
    intra_threads: int = Field(0, ge=0, description="threads per translate call; 0 = cores // inter_threads")
    inter_threads: int = Field(
        0, ge=0, description="translate calls running at once across all models; 0 = min(models, cores)")

    # -- batching and queues
    max_batch_size: int = Field(32, ge=1, description="most sentences in one translate_batch call")
    max_batch_tokens: int = Field(
        4096, ge=1, description="most padded source tokens (sentences x longest) in one call")
    max_wait_ms: float = Field(5.0, ge=0, description="how long a batch waits for more sentences")
    queue_size: int = Field(256, ge=1, description="sentences waiting per model before 503")
    request_timeout_s: float = Field(30.0, gt=0, description="a request waiting longer gets 504")

    # -- request limits
    max_texts: int = Field(64, ge=1, description="most texts in one request (q as a list)")
    max_chars: int = Field(5000, ge=1, description="most characters in one text")
    default_beam_size: int = Field(2, ge=1, description="beam size when a request gives none")
    max_beam_size: int = Field(8, ge=1, description="largest beam size a request may ask for")
    default_max_length: int = Field(
        DEFAULT_MAX_LENGTH, ge=1, description="output token limit when a request gives none")
    max_length_limit: int = Field(512, ge=1, description="largest max_length a request may ask for")
    output_length_ratio: float = Field(
        OutputLimit.ratio, ge=0,
        description="each output is also held to ratio x (source tokens + 1) + margin tokens (as evaluated)")
    output_length_margin: int = Field(
        OutputLimit.margin, ge=0, description="the margin of that per-sentence limit")
    max_alternatives: int = Field(
        3, ge=0, description="most alternatives (other translations from the n-best list) a request may ask "
                             "for")

    # -- language detection (source "auto", /detect)
    detect_languages: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="languages (ISO 639-1) detection weighs besides the served ones, so that text in them is "
                    "recognised and refused; comma-separated")
    detect_screen_share: float = Field(
        0.05, ge=0, le=1,
        description="a text of three words or more is refused when every language detection knows is weighed "
                    "and the candidates get less than this share together (lingua's low-accuracy models, "
                    "+75 MB); 0 = no screen")

    @field_validator("models", mode="before")
    @classmethod
    def _parse_models(cls, value: Any) -> Any:
        return _specs_from_text(value, ",", parse_model_specs)

    @field_validator("cascades", mode="before")
    @classmethod
    def _parse_cascades(cls, value: Any) -> Any:
        return _specs_from_text(value, ";", parse_cascade_specs)

    @field_validator("cascades")
    @classmethod
    def _check_cascades(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, models in value.items():
            if len(models) != 2:
                raise ValueError(f"cascade {name!r} needs two models, STUDENT,TEACHER; got {models}")
        return value

    @field_validator("api_keys", "compare_models", "detect_languages", mode="before")
    @classmethod
    def _parse_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("["):
                return json.loads(value)
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("detect_languages")
    @classmethod
    def _known_to_lingua(cls, codes: list[str]) -> list[str]:
        unknown = [code for code in codes if lingua_language(code) is None]
        if unknown:
            raise ValueError(f"language detection does not know {', '.join(unknown)} (give ISO 639-1 codes "
                             "such as de, en, fr)")
        return [code.strip().lower() for code in codes]

    @model_validator(mode="after")
    def _check(self) -> ServeSettings:
        if len(self.compare_models) != 2:
            raise ValueError(f"compare_models needs exactly two names, got {self.compare_models}")
        if self.default_beam_size > self.max_beam_size:
            raise ValueError("default_beam_size is larger than max_beam_size")
        if self.default_max_length > self.max_length_limit:
            raise ValueError("default_max_length is larger than max_length_limit")
        return self

    def thread_plan(self, n_models: int, cores: int | None = None) -> tuple[int, int]:
        """Returns (inter_threads, intra_threads) so that inter x intra <= cores.

        ``inter`` is the number of translate_batch calls that may run at the same
        time across *all* loaded models (one shared worker pool); each call uses
        ``intra`` threads. Idle models hold no running threads, so the cores are
        never oversubscribed however many models are loaded. Explicit settings are
        kept as given (the caller warns when they oversubscribe).
        """
        cores = cores or available_cores()
        inter = self.inter_threads or max(1, min(n_models, cores))
        intra = self.intra_threads or max(1, cores // inter)
        return inter, intra


def parse_model_specs(specs: list[str]) -> dict[str, Path]:
    """``["teacher=/m/t", ...]`` -> ``{"teacher": Path("/m/t")}`` with a clear error for a bad item."""
    models: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.strip().partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"model spec {spec!r} is not NAME=PATH")
        if name.strip() in models:
            raise ValueError(f"model name {name.strip()!r} given twice")
        models[name.strip()] = Path(path.strip())
    return models


def parse_cascade_specs(specs: list[str]) -> dict[str, list[str]]:
    """``["fast=student,teacher"]`` -> ``{"fast": ["student", "teacher"]}``, naming a bad item."""
    cascades: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, models = spec.strip().partition("=")
        pair = [model.strip() for model in models.split(",")]
        if not sep or not name.strip() or len(pair) != 2 or not all(pair):
            raise ValueError(f"cascade spec {spec!r} is not NAME=STUDENT,TEACHER")
        if name.strip() in cascades:
            raise ValueError(f"cascade name {name.strip()!r} given twice")
        cascades[name.strip()] = pair
    return cascades
