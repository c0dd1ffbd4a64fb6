"""What LibreTranslate's clients do, against a real ``wdserve serve``: its Python client, its web frontend's
requests (multipart FormData), JSON clients; detection, alternatives and HTML, and bad input for each.

The server serves the tiny models relabelled German -> English (``de_en_workdir``), with French as a
detection rival, so detection sees real languages; translations are garbage but real model output.
"""

from __future__ import annotations

from collections.abc import Iterator
from html import escape
from pathlib import Path

import httpx
import pytest
from serve_helpers import ServerProcess, metric, run, serving, settings_for

from wdserve.server.app import load_registry
from wdserve.server.models import ModelRegistry
from wdserve.server.schemas import TranslateResponse

GERMAN = "Ein Mann fährt mit dem Fahrrad über die Brücke."
GERMAN_TOO = "Die Kinder spielen im Garten hinter dem Haus."
ENGLISH = "A man rides his bicycle across the bridge while the sun is shining."
FRENCH = "Un homme traverse le pont à vélo pendant que le soleil brille."
MAX_CHARS = 300


@pytest.fixture(scope="module")
def server(de_en_workdir: Path) -> Iterator[ServerProcess]:
    running = ServerProcess(de_en_workdir, "--detect-languages", "fr", "--max-chars", str(MAX_CHARS),
                            "--max-alternatives", "3", "--default-max-length", "24")
    yield running
    running.stop()


@pytest.fixture()
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert 'status="500"' not in server.metrics()


def test_libretranslatepy_client_works_unchanged(server: ServerProcess) -> None:
    libretranslatepy = pytest.importorskip("libretranslatepy", reason="pip install libretranslatepy")
    lt = libretranslatepy.LibreTranslateAPI(server.url)
    assert lt.languages() == [{"code": "de", "name": "German", "targets": ["en"]}]
    detected = lt.detect(GERMAN)
    assert detected[0]["language"] == "de" and 50 < detected[0]["confidence"] <= 100
    assert {d["language"] for d in detected} == {"de", "en", "fr"}
    assert isinstance(lt.translate(GERMAN, "de", "en"), str)
    assert isinstance(lt.translate(GERMAN, "auto", "en"), str)


def test_the_web_frontend_s_requests(client: httpx.Client) -> None:
    settings = client.get("/frontend/settings").json()
    assert settings["language"] == {"source": {"code": "auto", "name": "Auto Detect"},
                                    "target": {"code": "en", "name": "English"}}
    assert settings["charLimit"] == MAX_CHARS and settings["keyRequired"] is False
    assert settings["filesTranslation"] is False and settings["supportedFilesFormat"] == []
    # the frontend posts FormData (multipart/form-data), with alternatives 3 and an empty key and secret
    fields = {"q": GERMAN, "source": "auto", "target": "en", "format": "text", "alternatives": "3",
              "api_key": "", "secret": ""}
    answer = client.post("/translate", files={key: (None, value) for key, value in fields.items()})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["detectedLanguage"]["language"] == "de" and 50 < body["detectedLanguage"]["confidence"] <= 100
    assert isinstance(body["translatedText"], str) and isinstance(body["alternatives"], list)
    assert 1 <= len(body["alternatives"]) <= 3 and body["translatedText"] not in body["alternatives"]
    html = client.post("/translate", files={key: (None, value) for key, value in
                                            {**fields, "q": f"<p>{GERMAN} <b>{GERMAN_TOO}</b></p>",
                                             "format": "html"}.items()})
    assert html.status_code == 200, html.text
    translated = html.json()["translatedText"]
    assert translated.startswith("<p>") and "</b></p>" in translated and "<b>" in translated


def test_json_and_form_clients(client: httpx.Client) -> None:
    one = client.post("/translate", json={"q": GERMAN, "source": "auto", "target": "en"}).json()
    detect = client.post("/detect", json={"q": GERMAN}).json()
    assert one["detectedLanguage"] == detect[0]  # the same detection, with lingua's confidence
    assert TranslateResponse.model_validate(one)
    many = client.post("/translate", json={"q": [GERMAN, GERMAN_TOO], "source": "auto", "target": "en",
                                           "alternatives": 2}).json()
    assert len(many["translatedText"]) == 2 and len(many["detectedLanguage"]) == 2
    assert [len(alternatives) <= 2 for alternatives in many["alternatives"]] == [True, True]
    form = client.post("/detect", data={"q": GERMAN})
    assert form.status_code == 200 and form.json() == detect
    explicit = client.post("/translate", data={"q": GERMAN, "source": "de", "target": "en"}).json()
    assert "detectedLanguage" not in explicit and "alternatives" not in explicit
    # HTML without a word to translate comes back as it was; the comparison takes HTML too
    bare = '<br><img src="a.png" alt="Ein Hund">&nbsp;<hr/>'
    assert client.post("/translate", json={"q": bare, "format": "html"}).json()["translatedText"] == bare
    compared = client.post("/translate/compare", json={"q": f"<p>{GERMAN}</p>", "format": "html"}).json()
    assert all(r["translatedText"].startswith("<p>") for r in compared["results"])


@pytest.mark.parametrize(("path", "body", "status", "words"), [
    ("/translate", {"q": ENGLISH, "source": "auto", "target": "en"}, 400, "looks like en"),
    ("/translate", {"q": FRENCH, "source": "auto", "target": "en"}, 400, "looks like fr"),
    ("/translate", {"q": "12345", "source": "auto", "target": "en"}, 400, "cannot tell"),
    ("/translate", {"q": GERMAN, "source": "zz", "target": "en"}, 400, "no served model translates zz -> en"),
    ("/translate", {"q": GERMAN, "source": "de", "target": "fr"}, 400, "no served model translates de -> fr"),
    ("/translate", {"q": GERMAN, "alternatives": 4}, 422, "alternatives: 4 is out of range 0..3"),
    ("/translate", {"q": GERMAN, "alternatives": -1}, 422, "out of range"),
    ("/translate", {"q": "<p>x</p><![foo[ y ]]>", "format": "html"}, 400, "HTML the parser cannot read"),
    ("/translate", {"q": "<p>" + "Hallo Welt. " * 30 + "</p>", "format": "html"}, 400,
     f"the limit is {MAX_CHARS}"),
    ("/translate", {"q": GERMAN, "format": "markdown"}, 422, "format"),
    ("/detect", {"q": ""}, 400, "empty"),
    ("/detect", {"q": ["a", "b"]}, 422, "q"),
    ("/detect", {}, 422, "q"),
])
def test_bad_input_is_a_json_error_and_the_server_stays_healthy(client: httpx.Client, path: str, body: dict,
                                                               status: int, words: str) -> None:
    answer = client.post(path, json=body)
    assert answer.status_code == status, answer.text
    assert list(answer.json()) == ["error"] and words in answer.json()["error"]
    assert client.post("/translate", json={"q": GERMAN, "source": "auto"}).status_code == 200


def test_huge_html_body_is_413(client: httpx.Client) -> None:
    huge = "<p>" + "<b>Hallo</b>" * 400_000 + "</p>"
    answer = client.post("/translate", json={"q": huge, "format": "html"})
    assert answer.status_code == 413 and "limit" in answer.json()["error"]


@pytest.fixture(scope="module")
def de_en_registry(de_en_workdir: Path) -> Iterator[ModelRegistry]:
    loaded = load_registry(settings_for(de_en_workdir))
    yield loaded
    loaded.close()


def test_alternatives_are_the_model_s_n_best_list(de_en_workdir: Path, de_en_registry: ModelRegistry) -> None:
    """In-process, against the model called directly: the response's alternatives are CTranslate2's
    hypotheses 2..N+1 of the same beam, and the beam is widened to hold them."""
    settings = settings_for(de_en_workdir, max_alternatives=3)
    registry = de_en_registry
    teacher = registry.resolve("teacher")

    async def scenario() -> None:
        async with serving(settings, registry) as http:
            answer = await http.post("/translate", json={"q": GERMAN, "model": "teacher", "beam_size": 1,
                                                         "alternatives": 3, "max_length": 24})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            (best, _, _, others), = teacher.translate_texts([teacher.encode(GERMAN)], 1, 24, num_hypotheses=4)
            assert body["translatedText"] == best
            assert body["alternatives"] == list(dict.fromkeys(text for text in others if text != best))
            assert len(body["alternatives"]) >= 1
            html = await http.post("/translate", json={"q": f"<i>{GERMAN}</i>", "model": "teacher",
                                                       "beam_size": 1, "alternatives": 3, "max_length": 24,
                                                       "format": "html"})
            assert html.json()["alternatives"] == [f"<i>{text}</i>" for text in body["alternatives"]]

    run(scenario())


def test_html_text_nodes_are_translated_as_plain_text_in_one_batch(de_en_workdir: Path,
                                                                   de_en_registry: ModelRegistry) -> None:
    """Each text node is translated exactly as the same text sent plain, and all their sentences
    (three, in two nodes) reach the model in one batch."""
    settings = settings_for(de_en_workdir, max_wait_ms=50)
    options = {"model": "teacher-int8", "beam_size": 1, "max_length": 24}

    async def scenario() -> None:
        async with serving(settings, de_en_registry) as http:
            plain = [(await http.post("/translate", json={"q": text, **options})).json()["translatedText"]
                     for text in (f"{GERMAN} {GERMAN_TOO}", GERMAN_TOO)]
            before = (await http.get("/metrics")).text
            html = await http.post("/translate", json={
                "q": f'<div class="a">\n  <p>{GERMAN} {GERMAN_TOO}</p><br><code>x = 1</code>'
                     f'<b title="Titel">{GERMAN_TOO}</b>&nbsp;</div>', "format": "html", **options})
            after = (await http.get("/metrics")).text
            assert html.status_code == 200, html.text
            assert html.json()["translatedText"] == (
                f'<div class="a">\n  <p>{escape(plain[0], quote=False)}</p><br><code>x = 1</code>'
                f'<b title="Titel">{escape(plain[1], quote=False)}</b>&nbsp;</div>')
            batches, sentences = (metric(after, f"wdserve_batch_size_{part}", model="teacher-int8")
                                  - metric(before, f"wdserve_batch_size_{part}", model="teacher-int8")
                                  for part in ("count", "sum"))
            assert (batches, sentences) == (1, 3)

    run(scenario())
