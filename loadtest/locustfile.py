"""Users who translate test-set sentences through ``POST /translate``.

    WDSERVE_SENTENCES=runs/tiny/data/test.src locust -f loadtest/locustfile.py --host http://127.0.0.1:8000

Each model in ``WDSERVE_LOAD_MODELS`` gets its own user class (``teacher`` ->
``TeacherUser``, ``student-kd`` -> ``StudentKdUser``): pick classes on the command
line or with ``--class-picker`` in the web UI. Requests are named ``/translate <model>``
so locust's statistics keep the models apart.

Settings (environment):
    WDSERVE_SENTENCES        source sentences, one per line (default runs/tiny/data/test.src)
    WDSERVE_LOAD_MODELS      comma-separated served model names (default "teacher,student")
    WDSERVE_LOAD_SOURCE      source language code } default: asked from GET /models
    WDSERVE_LOAD_TARGET      target language code }
    WDSERVE_LOAD_BEAM_SIZE   beam size sent with every request (default: the server's)
    WDSERVE_LOAD_MAX_LENGTH  max_length sent with every request (default: the server's)
    WDSERVE_LOAD_BATCH       sentences per request (default 1)
    WDSERVE_LOAD_API_KEY     api_key sent with every request (default none)
    WDSERVE_LOAD_SEED        seed of each user's sentence order (default 1)

Users send their next request as soon as the last one is answered (closed loop), so
``-u 1`` measures per-request latency and many users measure throughput.

With ``--csv PREFIX`` the file ``PREFIX_tokens.json`` records, per model, the
responses and target tokens received (tokens = whitespace-separated words of
``translatedText``), which ``wdserve bench`` turns into tokens per second.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import gevent
import locust.stats
import requests
from locust import HttpUser, constant, events, task
from locust.exception import StopUser

DEFAULT_SENTENCES = "runs/tiny/data/test.src"
log = logging.getLogger("wdserve.locustfile")


def read_sentences(path: str | Path) -> list[str]:
    """Non-empty lines of ``path``; a missing or empty file is an error that says what to set."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(
            f"sentence file not found: {path}. Set WDSERVE_SENTENCES to a file of source sentences, "
            "one per line (e.g. DIR/data/test.src written by `wdserve pipeline`)."
        )
    sentences = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not sentences:
        raise SystemExit(f"sentence file {path} has no non-empty lines")
    return sentences


def _optional_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"{name} must be an integer, got {value!r}") from None


SENTENCES = read_sentences(os.environ.get("WDSERVE_SENTENCES", DEFAULT_SENTENCES))
MODELS = [m.strip() for m in os.environ.get("WDSERVE_LOAD_MODELS", "teacher,student").split(",") if m.strip()]
BEAM_SIZE = _optional_int("WDSERVE_LOAD_BEAM_SIZE")
MAX_LENGTH = _optional_int("WDSERVE_LOAD_MAX_LENGTH")
BATCH = _optional_int("WDSERVE_LOAD_BATCH") or 1
SEED = _optional_int("WDSERVE_LOAD_SEED") or 1
API_KEY = os.environ.get("WDSERVE_LOAD_API_KEY") or None
LANGUAGES: dict[str, tuple[str, str]] = {}  # model -> (source, target), filled at test start

# model -> {"responses": n, "sentences": n, "tokens": n}; written beside locust's CSV at test stop
TOKENS: dict[str, dict[str, int]] = {}
_user_numbers = itertools.count()


def request_name(model: str) -> str:
    """The name locust files a model's requests under (``wdserve bench`` reads it back)."""
    return f"/translate {model}"


def languages_from_models_listing(listing: Any, model: str) -> tuple[str, str] | None:
    """(source, target) of ``model`` in a GET /models answer, or None when it is not listed."""
    entries = listing.get("models", listing) if isinstance(listing, dict) else listing
    if isinstance(entries, dict):  # {name: {...}}
        entries = [{"name": name, **info} for name, info in entries.items() if isinstance(info, dict)]
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict):
            continue
        names = {entry.get("name"), *(entry.get("aliases") or [])}
        if model in names and entry.get("source_lang") and entry.get("target_lang"):
            return entry["source_lang"], entry["target_lang"]
    return None


@events.test_start.add_listener
def resolve_languages(environment, **_kwargs) -> None:
    TOKENS.clear()  # the web UI can run several tests in one process
    source, target = os.environ.get("WDSERVE_LOAD_SOURCE"), os.environ.get("WDSERVE_LOAD_TARGET")
    if source and target:
        LANGUAGES.update({model: (source, target) for model in MODELS})
        return
    # A listener cannot stop locust cleanly: log why, and users of an unresolved model stop (StopUser).
    url = f"{(environment.host or '').rstrip('/')}/models"
    try:
        listing = requests.get(url, timeout=30).json()
    except (requests.RequestException, ValueError) as err:
        log.error("cannot read %s (%s); set WDSERVE_LOAD_SOURCE and WDSERVE_LOAD_TARGET", url, err)
        return
    for model in MODELS:
        pair = languages_from_models_listing(listing, model)
        if pair is None:
            log.error("model %r is not listed by %s; check WDSERVE_LOAD_MODELS", model, url)
        else:
            LANGUAGES[model] = pair


@events.test_stop.add_listener
def write_token_counts(environment, **_kwargs) -> None:
    prefix = getattr(environment.parsed_options, "csv_prefix", None)
    if prefix:
        Path(f"{prefix}_tokens.json").write_text(json.dumps(TOKENS, indent=2) + "\n", encoding="utf-8")


@events.quitting.add_listener
def give_csv_writer_a_last_turn(environment, **_kwargs) -> None:
    # Locust rewrites *_stats.csv from a greenlet every CSV_STATS_INTERVAL_SEC and not again at exit,
    # so the file can miss the run's last second (locust issues #1806, #2299). Users have stopped by
    # now: one more turn of that greenlet writes the final numbers, the ones the HTML report shows.
    if getattr(environment.parsed_options, "csv_prefix", None):
        gevent.sleep(locust.stats.CSV_STATS_INTERVAL_SEC + 0.25)


class TranslateUser(HttpUser):
    """Posts the next sentence(s) of its own shuffled copy of the test set, without pausing."""

    abstract = True
    model = ""
    wait_time = constant(0)

    def on_start(self) -> None:
        order = list(range(len(SENTENCES)))
        random.Random(SEED * 1_000_003 + next(_user_numbers)).shuffle(order)
        self.next_index = itertools.cycle(order)

    @task
    def translate(self) -> None:
        texts = [SENTENCES[next(self.next_index)] for _ in range(BATCH)]
        if self.model not in LANGUAGES:
            raise StopUser()  # resolve_languages logged why
        source, target = LANGUAGES[self.model]
        payload: dict[str, Any] = {
            "q": texts[0] if BATCH == 1 else texts, "source": source, "target": target,
            "format": "text", "model": self.model,
        }
        payload.update({k: v for k, v in (("beam_size", BEAM_SIZE), ("max_length", MAX_LENGTH),
                                          ("api_key", API_KEY)) if v is not None})
        with self.client.post("/translate", json=payload, name=request_name(self.model),
                              catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            try:
                translated = response.json()["translatedText"]
            except (ValueError, KeyError, TypeError):
                response.failure(f"no translatedText in answer: {response.text[:200]}")
                return
            outputs = [translated] if isinstance(translated, str) else list(translated)
            if len(outputs) != len(texts):
                response.failure(f"sent {len(texts)} sentences, got {len(outputs)} translations")
                return
            counts = TOKENS.setdefault(self.model, {"responses": 0, "sentences": 0, "tokens": 0})
            counts["responses"] += 1
            counts["sentences"] += len(outputs)
            counts["tokens"] += sum(len(text.split()) for text in outputs)


def user_class_name(model: str) -> str:
    """``student-kd`` -> ``StudentKdUser``."""
    words = "".join(c if c.isalnum() else " " for c in model).split()
    return "".join(word[:1].upper() + word[1:] for word in words) + "User"


for _model in MODELS:
    globals()[user_class_name(_model)] = type(
        user_class_name(_model), (TranslateUser,), {"model": _model, "__module__": __name__}
    )
