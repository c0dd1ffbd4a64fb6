"""The app in-process (httpx over ASGI, lifespan running) on the tiny exported models."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Annotated

import httpx
import pytest
from fastapi import Depends, FastAPI, Header, Request, Response
from pydantic import BaseModel
from serve_helpers import SENTENCE, metric, run, serving, settings_for

from wdserve.server.app import PlainRoute, State, create_app, get_model
from wdserve.server.models import ModelRegistry, ServedModel
from wdserve.server.schemas import CompareResponse, TranslateResponse


def rendered_from(model: type[BaseModel], body: dict) -> bool:
    """The body is exactly what rendering the route's response model would give (the routes render it
    themselves, so nothing else checks it against the documented schema)."""
    return model.model_validate(body).model_dump(mode="json", exclude_none=True) == body


def test_every_route_answers(tiny_workdir: Path, registry: ModelRegistry) -> None:
    async def scenario() -> None:
        async with serving(settings_for(tiny_workdir), registry) as client:
            assert (await client.get("/health")).json() == {"status": "alive"}
            ready = (await client.get("/ready")).json()
            assert ready["status"] == "ready" and "teacher-int8" in ready["models"]

            languages = (await client.get("/languages")).json()
            assert languages == [{"code": "xx", "name": "Synthetic source", "targets": ["yy"]}]

            models = {m["name"]: m for m in (await client.get("/models")).json()}
            assert set(models) == {f"{n}-{q}" for n in ("teacher", "student", "student-kd")
                                   for q in ("int8", "float32")}
            teacher = models["teacher-int8"]
            assert teacher["aliases"] == ["teacher"] and teacher["quantization"] == "int8"
            assert teacher["source_lang"] == "xx" and teacher["target_lang"] == "yy"
            assert teacher["method"] == "teacher" and teacher["parameters"] > 0
            assert models["student-int8"]["default"] and not teacher["default"]
            assert models["student-kd-float32"]["aliases"] == []

            metrics = await client.get("/metrics")
            assert metrics.status_code == 200 and "wdserve_requests_total" in metrics.text

    run(scenario())


def test_libretranslate_shape_string_and_list(tiny_workdir: Path, registry: ModelRegistry) -> None:
    async def scenario() -> None:
        async with serving(settings_for(tiny_workdir), registry) as client:
            one = await client.post("/translate", json={"q": SENTENCE, "source": "xx", "target": "yy"})
            assert one.status_code == 200, one.text
            body = one.json()
            assert isinstance(body["translatedText"], str) and body["translatedText"].strip()
            assert body["model"] == "student-int8"  # default "student" resolved to the int8 variant
            assert set(body["timing"]) == {"total_ms", "queue_ms", "translate_ms"}
            assert "detectedLanguage" not in body
            assert rendered_from(TranslateResponse, body)

            many = await client.post("/translate", json={
                "q": [SENTENCE, "this child helps a tree"], "target": "yy",
                "format": "text", "api_key": "", "alternatives": 0, "model": "teacher", "beam_size": 1})
            assert many.status_code == 200, many.text
            body = many.json()
            assert isinstance(body["translatedText"], list) and len(body["translatedText"]) == 2
            assert body["model"] == "teacher-int8"
            assert "detectedLanguage" not in body and "alternatives" not in body  # not asked for
            assert rendered_from(TranslateResponse, body)

            # LibreTranslate's Python client posts form-encoded fields
            form = await client.post("/translate", data={"q": SENTENCE, "source": "xx", "target": "yy"})
            assert form.status_code == 200, form.text
            assert isinstance(form.json()["translatedText"], str)

            # greedy decoding is deterministic: the same sentence gives the same output alone or in a list
            greedy = {"source": "xx", "target": "yy", "model": "teacher-float32", "beam_size": 1}
            alone = (await client.post("/translate", json={"q": SENTENCE, **greedy})).json()
            listed = (await client.post("/translate", json={"q": [SENTENCE, SENTENCE], **greedy})).json()
            assert listed["translatedText"] == [alone["translatedText"]] * 2

    run(scenario())


def test_sentences_are_split_translated_as_a_batch_and_joined(tiny_workdir: Path,
                                                             registry: ModelRegistry) -> None:
    async def scenario() -> None:
        settings = settings_for(tiny_workdir, max_wait_ms=0)
        async with serving(settings, registry) as client:
            options = {"source": "xx", "target": "yy", "model": "teacher-float32", "beam_size": 1}
            first = (await client.post("/translate", json={"q": "This book finds a tree.", **options})).json()
            second = (await client.post("/translate", json={"q": "A child helps.", **options})).json()
            both = await client.post("/translate", json={"q": "This book finds a tree. A child helps.",
                                                         **options})
            assert both.status_code == 200
            expected = f"{first['translatedText']} {second['translatedText']}"
            assert both.json()["translatedText"] == expected
            metrics = (await client.get("/metrics")).text
            calls = metric(metrics, "wdserve_batch_size_count", model="teacher-float32")
            sentences = metric(metrics, "wdserve_batch_size_sum", model="teacher-float32")
            # three calls: two of one sentence and one call holding both sentences of the third request
            assert (calls, sentences) == (3, 4)

    run(scenario())


def test_compare_runs_both_models(tiny_workdir: Path, registry: ModelRegistry) -> None:
    async def scenario() -> None:
        async with serving(settings_for(tiny_workdir), registry) as client:
            default = await client.post("/translate/compare", json={"q": SENTENCE})
            assert default.status_code == 200, default.text
            results = default.json()["results"]
            assert [r["model"] for r in results] == ["teacher-int8", "student-int8"]
            assert all(isinstance(r["translatedText"], str) and r["timing"]["total_ms"] > 0 for r in results)
            assert rendered_from(CompareResponse, default.json())

            chosen = await client.post("/translate/compare", json={
                "q": [SENTENCE], "models": ["student-kd", "teacher-float32"], "beam_size": 1})
            assert [r["model"] for r in chosen.json()["results"]] == ["student-kd-int8", "teacher-float32"]
            assert all(isinstance(r["translatedText"], list) for r in chosen.json()["results"])

            bad = await client.post("/translate/compare", json={"q": SENTENCE, "models": ["teacher"]})
            assert bad.status_code == 422 and "models" in bad.json()["error"]

    run(scenario())


LONG = "qzjw" * 120  # 480 characters, more SentencePiece pieces than the model has positions
BAD_REQUESTS = [  # (body or raw bytes, content type, status, words the error must contain)
    (b'{"q": "unterminated', "application/json", 400, "malformed JSON"),
    (b'{"q": "caf\xe9"}', "application/json", 400, "UTF-8"),
    (b'["a list"]', "application/json", 422, "JSON object"),
    (b"q=hi", "text/plain", 415, "content type"),
    ({"source": "xx"}, None, 422, "q"),
    ({"q": 5}, None, 422, "q"),
    ({"q": ["ok", 7]}, None, 422, "q"),
    ({"q": ""}, None, 400, "empty"),
    ({"q": " \n\t "}, None, 400, "empty"),
    ({"q": ["fine", "  "]}, None, 400, "q[1] is empty"),
    ({"q": []}, None, 422, "empty"),
    ({"q": ["x"] * 9}, None, 422, "at most 8"),
    ({"q": "x" * 501}, None, 400, "limit is 500"),
    ({"q": "bell \u0007 here"}, None, 400, "U+0007"),
    ({"q": "c1 \u0085 here"}, None, 400, "U+0085"),
    (b'{"q": "lone \\ud800 surrogate"}', "application/json", 400, "UTF-8"),
    ({"q": "hi", "model": "nope"}, None, 400, "unknown model 'nope'"),
    ({"q": "hi", "source": "de", "target": "en"}, None, 400, "de -> en"),
    ({"q": "hi", "model": "teacher", "target": "en"}, None, 400, "not any -> en"),
    ({"q": "hi", "beam_size": 0}, None, 422, "beam_size"),
    ({"q": "hi", "beam_size": 5}, None, 422, "1..4"),
    ({"q": "hi", "beam_size": "wide"}, None, 422, "beam_size"),
    ({"q": "hi", "beam_size": True}, None, 422, "boolean"),
    ({"q": "hi", "max_length": 0}, None, 422, "max_length"),
    ({"q": "hi", "max_length": 65}, None, 422, "1..64"),
    ({"q": "hi", "format": "xml"}, None, 422, "format"),
    ({"q": "hi", "alternatives": 4}, None, 422, "alternatives: 4 is out of range 0..3"),
    ({"q": "hi", "alternatives": -1}, None, 422, "alternatives"),
    ({"q": "hi", "alternatives": "many"}, None, 422, "alternatives"),
    ({"q": "hi", "source": "auto"}, None, 400, "lingua knows none of the served source languages (xx)"),
    ({"q": "<p>x</p><![foo[ y ]]>", "format": "html"}, None, 400, "HTML the parser cannot read"),
    ({"q": LONG}, None, 400, "at most 127"),
]


@pytest.mark.parametrize(("body", "content_type", "status", "words"), BAD_REQUESTS,
                         ids=[f"{case[2]}-{case[3]}" for case in BAD_REQUESTS])
def test_bad_input_is_a_json_error_and_the_server_keeps_serving(
        tiny_workdir: Path, registry: ModelRegistry, body: object, content_type: str | None, status: int,
        words: str) -> None:
    async def scenario() -> None:
        async with serving(settings_for(tiny_workdir), registry) as client:
            if isinstance(body, bytes):
                headers = {"content-type": content_type}
                response = await client.post("/translate", content=body, headers=headers)
            else:
                response = await client.post("/translate", json=body)
            assert response.status_code == status, response.text
            assert response.headers["content-type"] == "application/json"
            assert list(response.json()) == ["error"]
            assert words in response.json()["error"]
            after = await client.post("/translate", json={"q": SENTENCE})
            assert after.status_code == 200

    run(scenario())


def test_oversized_body_and_unknown_route_are_json_errors(tiny_workdir: Path,
                                                         registry: ModelRegistry) -> None:
    async def scenario() -> None:
        async with serving(settings_for(tiny_workdir), registry) as client:
            huge = await client.post("/translate", content=b"x" * 200_000,
                                     headers={"content-type": "application/json"})
            assert huge.status_code == 413 and "limit" in huge.json()["error"]
            missing = await client.get("/nope")
            assert missing.status_code == 404 and missing.json() == {"error": "Not Found"}
            wrong_method = await client.get("/translate")
            assert wrong_method.status_code == 405 and "error" in wrong_method.json()

    run(scenario())


def test_api_keys(tiny_workdir: Path, registry: ModelRegistry) -> None:
    async def scenario() -> None:
        async with serving(settings_for(tiny_workdir, api_keys=["k1", "k2"]), registry) as client:
            for body in ({"q": SENTENCE}, {"q": SENTENCE, "api_key": "wrong"}, {"q": SENTENCE, "api_key": 3}):
                denied = await client.post("/translate", json=body)
                assert denied.status_code == 403 and "API key" in denied.json()["error"]
            assert (await client.post("/translate/compare", json={"q": SENTENCE})).status_code == 403
            allowed = await client.post("/translate", json={"q": SENTENCE, "api_key": "k2"})
            assert allowed.status_code == 200
            header = await client.post("/translate", json={"q": SENTENCE}, headers={"X-API-Key": "k1"})
            assert header.status_code == 200
            assert (await client.get("/models")).status_code == 200  # only translation needs a key

    run(scenario())


def test_concurrent_requests_are_batched(tiny_workdir: Path, registry: ModelRegistry) -> None:
    async def scenario() -> None:
        settings = settings_for(tiny_workdir, max_wait_ms=50, max_batch_size=16)
        async with serving(settings, registry) as client:
            body = {"q": SENTENCE, "model": "student-float32", "beam_size": 1, "max_length": 16}
            responses = await asyncio.gather(*[client.post("/translate", json=body) for _ in range(32)])
            assert [r.status_code for r in responses] == [200] * 32
            assert len({r.json()["translatedText"] for r in responses}) == 1
            metrics = (await client.get("/metrics")).text
            batches = metric(metrics, "wdserve_batch_size_count", model="student-float32")
            assert metric(metrics, "wdserve_batch_size_sum", model="student-float32") == 32
            assert batches <= 8, f"32 concurrent requests took {batches} translate_batch calls"
            served = metric(metrics, "wdserve_requests_total", route="/translate", model="student-float32",
                            status="200")
            assert served == 32
            assert metric(metrics, "wdserve_output_tokens_total", model="student-float32") > 0

    run(scenario())


def slow_translate(served, seconds: float):
    """A model fault/overload stand-in: the real translation, after a pause."""
    real = served.translate_texts

    def translate_texts(batch, *options):
        time.sleep(seconds)
        return real(batch, *options)

    return translate_texts


def test_full_queue_answers_503_with_retry_after(tiny_workdir: Path, registry: ModelRegistry,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    served = registry.models["student-int8"]
    monkeypatch.setattr(served, "translate_texts", slow_translate(served, 0.3))

    async def scenario() -> None:
        settings = settings_for(tiny_workdir, queue_size=2, max_batch_size=1, max_wait_ms=0)
        async with serving(settings, registry) as client:
            responses = await asyncio.gather(*[client.post("/translate", json={"q": SENTENCE})
                                               for _ in range(8)])
            statuses = sorted(r.status_code for r in responses)
            assert statuses.count(200) >= 2 and statuses.count(503) >= 1, statuses
            assert set(statuses) <= {200, 503}
            rejected = next(r for r in responses if r.status_code == 503)
            assert int(rejected.headers["retry-after"]) >= 1
            assert "overloaded" in rejected.json()["error"]
            assert (await client.get("/health")).status_code == 200
            assert (await client.post("/translate", json={"q": SENTENCE})).status_code == 200
            errors = metric((await client.get("/metrics")).text, "wdserve_errors_total",
                            route="/translate", model="student-int8", status="503")
            assert errors == statuses.count(503)

    run(scenario())


def test_request_past_its_deadline_gets_504(tiny_workdir: Path, registry: ModelRegistry,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    served = registry.models["student-int8"]
    monkeypatch.setattr(served, "translate_texts", slow_translate(served, 0.4))

    async def scenario() -> None:
        settings = settings_for(tiny_workdir, request_timeout_s=0.1)
        async with serving(settings, registry) as client:
            late = await client.post("/translate", json={"q": SENTENCE})
            assert late.status_code == 504 and "within 0.1 s" in late.json()["error"]
            assert (await client.get("/ready")).status_code == 200

    run(scenario())


def test_model_fault_is_a_500_json_error_and_serving_continues(tiny_workdir: Path, registry: ModelRegistry,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    served = registry.models["student-int8"]
    real = served.translate_texts
    calls = []

    def flaky(batch, *options):
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("simulated CTranslate2 failure")
        return real(batch, *options)

    monkeypatch.setattr(served, "translate_texts", flaky)

    async def scenario() -> None:
        async with serving(settings_for(tiny_workdir), registry) as client:
            failed = await client.post("/translate", json={"q": SENTENCE})
            assert failed.status_code == 500 and "RuntimeError" in failed.json()["error"]
            assert (await client.post("/translate", json={"q": SENTENCE})).status_code == 200

    run(scenario())


def test_openapi_documents_every_route_and_error(tiny_workdir: Path, registry: ModelRegistry) -> None:
    async def scenario() -> None:
        async with serving(settings_for(tiny_workdir), registry) as client:
            spec = (await client.get("/openapi.json")).json()
        paths = spec["paths"]
        assert set(paths) == {"/translate", "/translate/compare", "/detect", "/languages", "/models",
                              "/frontend/settings", "/health", "/ready", "/metrics", "/"}
        for route in ("/translate", "/translate/compare"):
            operation = paths[route]["post"]
            assert {"400", "403", "413", "415", "422", "503", "504"} <= set(operation["responses"])
            schema = operation["requestBody"]["content"]["application/json"]["schema"]
            assert {"q", "source", "target", "format", "api_key", "beam_size", "max_length"} <= set(
                schema["properties"])
            error = operation["responses"]["503"]["content"]["application/json"]["schema"]
            assert error == {"$ref": "#/components/schemas/ErrorResponse"}
        for route, model in (("/translate", "TranslateResponse"), ("/translate/compare", "CompareResponse")):
            ok = paths[route]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
            assert ok == {"$ref": f"#/components/schemas/{model}"}
        json.dumps(spec)

    run(scenario())


def test_before_the_models_load_every_model_route_answers_503(tiny_workdir: Path,
                                                              registry: ModelRegistry) -> None:
    async def scenario() -> None:
        app = create_app(settings_for(tiny_workdir), registry)  # lifespan not run: nothing is loaded
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://wdserve") as client:
            for method, path in (("POST", "/translate"), ("POST", "/translate/compare"), ("GET", "/models"),
                                 ("GET", "/languages"), ("GET", "/ready"), ("POST", "/detect"),
                                 ("GET", "/frontend/settings")):
                response = await client.request(method, path, json={"q": SENTENCE})
                assert response.status_code == 503, (path, response.text)
                assert response.json() == {"error": "models are not loaded yet"}
                assert response.headers["retry-after"] == "1"
            assert (await client.get("/health")).status_code == 200

    run(scenario())


def test_checks_run_in_order_and_errors_are_counted_under_the_chosen_model(
        tiny_workdir: Path, registry: ModelRegistry) -> None:
    async def scenario() -> None:
        async with serving(settings_for(tiny_workdir, api_keys=["k"]), registry) as client:
            async def error(body: dict) -> tuple[int, str]:
                response = await client.post("/translate", json=body)
                return response.status_code, response.json()["error"]

            # API key before the fields, the fields before the model, the model before the texts
            assert (await error({"q": 5, "model": "nope"}))[0] == 403
            assert (await error({"q": 5, "model": "nope", "api_key": "k"}))[0] == 422
            assert "unknown model" in (await error({"q": [], "model": "nope", "api_key": "k"}))[1]
            assert "q: the list is empty" in (await error({"q": [], "model": "teacher", "api_key": "k",
                                                           "beam_size": 99}))[1]
            metrics = (await client.get("/metrics")).text
            assert metric(metrics, "wdserve_errors_total", route="/translate", model="-", status="403") == 1
            assert metric(metrics, "wdserve_errors_total", route="/translate", model="-", status="400") == 1
            assert metric(metrics, "wdserve_errors_total", route="/translate", model="teacher-int8",
                          status="422") == 1

            compared = await client.post("/translate/compare", json={"q": "", "api_key": "k"})
            assert compared.status_code == 400 and "empty" in compared.json()["error"]
            assert metric((await client.get("/metrics")).text, "wdserve_errors_total",
                          route="/translate/compare", model="teacher-int8|student-int8", status="400") == 1

    run(scenario())


def test_dependency_overrides_reach_the_translation_routes(tiny_workdir: Path,
                                                           registry: ModelRegistry) -> None:
    async def always_the_kd_student(request: Request, state: State) -> ServedModel:
        request.state.model = "student-kd-float32"
        return state.registry.models["student-kd-float32"]

    async def scenario() -> None:
        app = create_app(settings_for(tiny_workdir), registry)
        app.dependency_overrides[get_model] = always_the_kd_student
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://wdserve") as client:
                response = await client.post("/translate", json={"q": SENTENCE, "model": "teacher"})
                assert response.status_code == 200, response.text
                assert response.json()["model"] == "student-kd-float32"
                assert rendered_from(TranslateResponse, response.json())
                app.dependency_overrides.clear()
                response = await client.post("/translate", json={"q": SENTENCE, "model": "teacher"})
                assert response.json()["model"] == "teacher-int8"

    run(scenario())


# endpoints a PlainRoute cannot solve (at module level: FastAPI resolves the annotations in the module)
def sync_dependency() -> int:
    return 1


async def takes_sync(value: Annotated[int, Depends(sync_dependency)]) -> Response:
    return Response()


async def takes_header(token: Annotated[str, Header()]) -> Response:
    return Response()


async def header_dependency(request: Request, token: Annotated[str, Header()]) -> str:
    return token


async def takes_header_dependency(value: Annotated[str, Depends(header_dependency)]) -> Response:
    return Response()


@pytest.mark.parametrize(("endpoint", "words"), [
    (takes_sync, "dependency <function sync_dependency .*> must be an async function"),
    (takes_header, "takes_header takes header parameters"),
    (takes_header_dependency, "header_dependency takes header parameters"),
])
def test_plain_routes_refuse_what_they_cannot_solve_when_the_app_is_built(endpoint, words: str) -> None:
    with pytest.raises(TypeError, match=words):
        FastAPI().router.add_api_route("/x", endpoint, methods=["POST"], route_class_override=PlainRoute)


def test_under_any_asgi_server_a_client_leaving_withdraws_its_sentences(tiny_workdir: Path,
                                                                         registry: ModelRegistry) -> None:
    """Without wdserve serve's disconnect hook the app learns of the disconnect from receive()."""
    settings = settings_for(tiny_workdir, max_wait_ms=30000, max_batch_size=64)
    body = json.dumps({"q": [SENTENCE] * 3, "model": "teacher-float32"}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/translate", "raw_path": b"/translate", "query_string": b"",
             "root_path": "",
             "headers": [(b"host", b"wdserve"), (b"content-type", b"application/json")],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}

    async def scenario() -> tuple[list[dict], str]:
        app = create_app(settings, registry)
        async with app.router.lifespan_context(app):
            gone = asyncio.Event()
            messages = iter([{"type": "http.request", "body": body, "more_body": False}])
            sent: list[dict] = []

            async def receive() -> dict:
                message = next(messages, None)
                if message is None:  # after the body, as ASGI servers do: the next message is the disconnect
                    await gone.wait()
                    message = {"type": "http.disconnect"}
                return message

            async def send(message: dict) -> None:
                sent.append(message)

            request = asyncio.create_task(app({**scope, "state": {}}, receive, send))
            batcher = app.state.server.batchers["teacher-float32"]
            while batcher.depth < 3:
                await asyncio.sleep(0.01)
            gone.set()
            await asyncio.wait_for(request, 30)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://wdserve") as client:
                return sent, (await client.get("/metrics")).text

    sent, metrics = run(scenario())
    assert sent[0]["status"] == 499
    assert metric(metrics, "wdserve_cancelled_sentences_total", model="teacher-float32") == 3
    assert metric(metrics, "wdserve_requests_total", route="/translate", model="teacher-float32",
                  status="499") == 1
