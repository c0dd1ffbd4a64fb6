"""Quality-aware serving (issue #19): confidence scores, the student-first cascade, shadow agreement.

In-process on the tiny exported models, greedy decoding where outputs are compared (deterministic).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from serve_helpers import SENTENCE, metric, run, serving, settings_for

from wdserve.errors import ConfigError
from wdserve.server.app import check_serving_plan, create_app
from wdserve.server.batching import ClientWatch
from wdserve.server.confidence import confidence, text_confidence
from wdserve.server.models import ModelRegistry
from wdserve.server.schemas import TranslateResponse
from wdserve.server.service import ApiError, Job, Sentence
from wdserve.server.shadow import chrf

GREEDY = {"source": "xx", "target": "yy", "beam_size": 1}
STUDENT, TEACHER = "student-float32", "teacher-float32"


def sources_of(tiny_workdir: Path, n: int = 12) -> list[str]:
    return (tiny_workdir / "data" / "test.src").read_text(encoding="utf-8").splitlines()[:n]


def rendered(body: dict[str, Any]) -> bool:
    """The body is what rendering the documented response model gives (the route renders it itself)."""
    return TranslateResponse.model_validate(body).model_dump(mode="json", exclude_none=True) == body


# -- confidence

def test_confidence_is_the_geometric_mean_probability_of_the_output_tokens(tiny_workdir: Path,
                                                                          registry: ModelRegistry) -> None:
    """Teacher-forcing the model on its own output gives the token log-probabilities the score averages:
    </s> included, unless the output ran into its length limit and never wrote one."""
    served = registry.models[TEACHER]
    pieces = [served.encode(s) for s in sources_of(tiny_workdir, 12)]
    ended = 0
    for beam_size in (1, 3):
        outputs = served.decode(pieces, beam_size, 32, return_scores=True)
        forced = served.translator.score_batch(pieces, [o.tokens for o in outputs])
        for source, output, scored in zip(pieces, outputs, forced, strict=True):
            assert scored.tokens[-1] == "</s>" and len(scored.log_probs) == len(output.tokens) + 1
            wrote_end = len(output.tokens) < served.output_limit.tokens(len(source), 32)
            ended += wrote_end
            counted = scored.log_probs if wrote_end else scored.log_probs[:-1]
            expected = math.exp(sum(counted) / len(counted))
            assert confidence(output.log_prob) == pytest.approx(expected, rel=1e-4)
    assert ended >= 6  # most outputs end with </s>, so the usual case is the one checked
    assert all(o.log_prob is None for o in served.decode(pieces, 1, 32))


def test_a_text_weighs_its_sentences_by_their_tokens() -> None:
    # 1 token + </s> at log-prob -1, 3 tokens + </s> at -0.5: exp((2 x -1 + 4 x -0.5) / 6)
    sentences = [Sentence("a", "x", "m", 1, -1.0), Sentence("b", "y z w", "m", 3, -0.5)]
    assert text_confidence(sentences) == pytest.approx(math.exp(-4 / 6))
    assert text_confidence(sentences[:1]) == pytest.approx(math.exp(-1))
    assert text_confidence([Sentence("a", "x", "m", 1, None)]) is None


class ScoreSpy:
    """The real translator, recording whether each call asked for scores."""

    def __init__(self, translator: Any) -> None:
        self.translator = translator
        self.asked: list[bool] = []

    def translate_batch(self, batch: list[list[str]], **options: Any) -> Any:
        self.asked.append(options.get("return_scores", False))
        return self.translator.translate_batch(batch, **options)


def test_confidence_per_text_and_sentence_only_when_asked(tiny_workdir: Path, registry: ModelRegistry,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    served = registry.models[TEACHER]
    spy = ScoreSpy(served.translator)
    monkeypatch.setattr(served, "translator", spy)

    async def scenario() -> None:
        async with serving(settings_for(tiny_workdir), registry) as client:
            plain = (await client.post("/translate", json={"q": SENTENCE, "model": TEACHER, **GREEDY})).json()
            assert "confidence" not in plain and "sentences" not in plain
            assert spy.asked and not any(spy.asked)  # (a call again under a sentence's own limit asks alike)
            unscored = len(spy.asked)

            texts = ["This book finds a tree.", "This book finds a tree. A child helps."]
            body = (await client.post("/translate", json={"q": texts, "model": TEACHER,
                                                          "return_confidence": True, **GREEDY})).json()
            assert spy.asked[unscored:] and all(spy.asked[unscored:])
            assert rendered(body)
            first, second = body["sentences"]
            assert [len(first), len(second)] == [1, 2]
            assert all(s["model"] == TEACHER and 0 < s["confidence"] <= 1 for s in first + second)
            assert [s["translatedText"] for s in second] == [first[0]["translatedText"],
                                                             second[1]["translatedText"]]
            # one sentence: the text's confidence is its sentence's; two: between theirs
            assert body["confidence"][0] == first[0]["confidence"]
            low, high = sorted(s["confidence"] for s in second)
            assert low <= body["confidence"][1] <= high

            one = (await client.post("/translate", json={"q": SENTENCE, "model": TEACHER,
                                                         "return_confidence": True, **GREEDY})).json()
            assert isinstance(one["confidence"], float) and isinstance(one["sentences"], list)
            assert one["sentences"][0]["confidence"] == one["confidence"]
            metrics = (await client.get("/metrics")).text
            assert metric(metrics, "wdserve_sentence_confidence_count", model=TEACHER) == 4

    run(scenario())


# -- the cascade

def cascade_settings(tiny_workdir: Path, **overrides: Any) -> Any:
    return settings_for(tiny_workdir, cascades={"fast": [STUDENT, TEACHER]}, **overrides)


def test_cascade_sends_exactly_the_unsure_sentences_to_the_teacher(tiny_workdir: Path,
                                                                  registry: ModelRegistry) -> None:
    sources = sources_of(tiny_workdir, 8)  # the tests' max_texts

    async def translate(client: Any, model: str, **extra: Any) -> dict[str, Any]:
        response = await client.post("/translate", json={"q": sources, "model": model, **GREEDY, **extra})
        assert response.status_code == 200, response.text
        return response.json()

    async def scenario() -> None:
        async with serving(cascade_settings(tiny_workdir), registry) as client:
            student = await translate(client, STUDENT, return_confidence=True)
            teacher = await translate(client, TEACHER)
            scores = [text[0]["confidence"] for text in student["sentences"]]
            threshold = sorted(scores)[len(scores) // 2]  # about half the sentences fall below it

            for t in (0.0, threshold, 1.0):
                body = await translate(client, "fast", cascade_threshold=t)
                assert body["model"] == "fast"
                assert rendered(body)
                unsure = [score < t for score in scores]
                assert [text[0]["model"] for text in body["sentences"]] == [
                    TEACHER if u else STUDENT for u in unsure]
                assert body["translatedText"] == [
                    t_text if u else s_text for u, s_text, t_text in zip(
                        unsure, student["translatedText"], teacher["translatedText"], strict=True)]
                assert all("confidence" not in s for text in body["sentences"] for s in text)
            assert 0 < sum(score < threshold for score in scores) < len(scores)

            metrics = (await client.get("/metrics")).text
            fell_back = sum(score < threshold for score in scores) + len(scores)  # middle + 1.0
            assert metric(metrics, "wdserve_cascade_sentences_total", cascade="fast", outcome="teacher") \
                == fell_back
            assert metric(metrics, "wdserve_cascade_sentences_total", cascade="fast", outcome="student") \
                == 3 * len(scores) - fell_back
            models = {m["name"]: m for m in (await client.get("/models")).json()}
            assert models["fast"]["cascade"] == {"student": STUDENT, "teacher": TEACHER, "threshold": 0.5}

    run(scenario())


# A held model holds one translate thread: two, so the other model still runs beside it (as on 2 cores)
TWO_THREADS = {"inter_threads": 2, "intra_threads": 1}


class Gate:
    """A served model's translate call held until the test opens the gate: "the teacher is busy"
    without sleeps or wall-clock bounds, which a loaded machine stretches."""

    def __init__(self, served: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real = served.translate_texts
        self.event = threading.Event()
        self.entered = 0  # calls that reached the gate
        self.broken = False
        monkeypatch.setattr(served, "translate_texts", self.translate_texts)

    def translate_texts(self, batch: list[list[str]], *args: Any) -> Any:
        self.entered += 1
        if not self.event.wait(timeout=60):
            raise RuntimeError("the test never opened the gate")
        if self.broken:
            raise RuntimeError("simulated model fault")
        return self.real(batch, *args)

    def open(self) -> None:
        self.event.set()

    def close(self) -> None:
        self.event.clear()

    async def until_entered(self, calls: int) -> None:
        await until(lambda: self.entered >= calls, f"{calls} calls at the gate")


async def until(condition: Any, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never: {what}")
        await asyncio.sleep(0.01)


async def until_metric(client: Any, sample: str, value: float, **labels: str) -> str:
    deadline = time.monotonic() + 30
    while True:
        text = (await client.get("/metrics")).text
        if metric(text, sample, **labels) == value:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"{sample} {labels} never reached {value}")
        await asyncio.sleep(0.02)


def test_cascade_keeps_the_student_when_the_teacher_is_busy_or_fails(tiny_workdir: Path,
                                                                    registry: ModelRegistry,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(registry.models[TEACHER], monkeypatch)
    request = {"q": SENTENCE, "model": "fast", "cascade_threshold": 1.0, **GREEDY}
    settings = cascade_settings(tiny_workdir, max_batch_size=1, max_wait_ms=0, **TWO_THREADS)

    async def scenario() -> None:
        async with serving(settings, registry) as client:
            # the teacher runs one request and has a batch's worth (one sentence) waiting: a backlog
            blockers = [asyncio.create_task(client.post("/translate", json={"q": SENTENCE, "model": TEACHER}))
                        for _ in range(2)]
            await gate.until_entered(1)
            await until_metric(client, "wdserve_queue_depth", 1, model=TEACHER)
            busy = await client.post("/translate", json=request)
            assert not gate.event.is_set()  # answered while the teacher was still held: it did not wait
            assert busy.status_code == 200 and busy.json()["sentences"][0]["model"] == STUDENT
            gate.open()
            await asyncio.gather(*blockers)

            gate.broken = True
            failed = await client.post("/translate", json=request)
            assert failed.status_code == 200 and failed.json()["sentences"][0]["model"] == STUDENT
            metrics = (await client.get("/metrics")).text
            assert metric(metrics, "wdserve_cascade_sentences_total", cascade="fast", outcome="degraded") == 2

    run(scenario())


def test_a_client_that_leaves_withdraws_its_fallback(tiny_workdir: Path, registry: ModelRegistry,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    teacher = registry.models[TEACHER]
    gate = Gate(teacher, monkeypatch)
    settings = cascade_settings(tiny_workdir, max_batch_size=4, max_wait_ms=0, **TWO_THREADS)

    async def scenario() -> None:
        app = create_app(settings, registry)
        async with app.router.lifespan_context(app):
            state = app.state.server
            teacher_batcher = state.batchers[TEACHER]
            running = asyncio.create_task(teacher_batcher.translate([teacher.encode(SENTENCE)], 1, 24, 30))
            await gate.until_entered(1)  # the teacher is busy: the fallback will wait in its queue
            watch = ClientWatch()
            job = Job(sources_of(tiny_workdir, 3), 1, 24, cascade_threshold=1.0)
            cascade = asyncio.create_task(state.cascades["fast"].translate(state, job, watch))
            await until(lambda: teacher_batcher.depth == 3, "the fallback's 3 sentences queued")
            watch.lost()
            with pytest.raises(ApiError) as left:
                await cascade
            assert left.value.status == 499 and teacher_batcher.depth == 0
            gate.open()
            await running
            assert gate.entered == 1  # the withdrawn sentences never reached the teacher
            metrics = app.state.server.metrics.registry
            assert metrics.get_sample_value("wdserve_cancelled_sentences_total", {"model": TEACHER}) == 3

    run(scenario())


def test_cascade_names_are_checked_before_serving(registry: ModelRegistry, tiny_workdir: Path) -> None:
    check_serving_plan(cascade_settings(tiny_workdir), registry)
    for cascades, message in (({"fast": ["nope", TEACHER]}, "'nope' is not served"),
                              ({"teacher": [STUDENT, TEACHER]}, "already a served model")):
        with pytest.raises(ConfigError, match=message):
            check_serving_plan(settings_for(tiny_workdir, cascades=cascades), registry)
    with pytest.raises(ConfigError, match="shadow_model 'ghost'"):
        check_serving_plan(settings_for(tiny_workdir, shadow_rate=0.1, shadow_model="ghost"), registry)


# -- shadow agreement

@pytest.mark.parametrize(("hypothesis", "reference"), [
    ("the cat sat on the mat", "the cat sat on the mat"),
    ("the cat sat on the mat", "a cat is sitting on a mat"),
    ("ab", "abcdefgh"), ("abcdefgh", "ab"), ("x", "y"), ("", "abc"), ("abc", ""), ("", ""),
    ("Grüße aus Köln!", "Grüße aus Bonn."), ("a a a a", "a"), ("lo vask granto", "lo  vask\tgranti"),
])
def test_chrf_is_sacrebleus(hypothesis: str, reference: str) -> None:
    sacrebleu = pytest.importorskip("sacrebleu")
    expected = sacrebleu.sentence_chrf(hypothesis, [reference]).score
    assert chrf(hypothesis, reference) == pytest.approx(expected, abs=1e-9)


def test_shadow_agreement_falls_when_a_worse_student_is_served(tiny_workdir: Path,
                                                              registry: ModelRegistry) -> None:
    """The teacher served again under another name agrees with itself (chrF 100); the barely trained
    student does not: the histogram and /models tell them apart."""
    reference = registry.models[TEACHER]
    shadowed = ModelRegistry({TEACHER: reference, "twin": replace(reference, name="twin"),
                              STUDENT: registry.models[STUDENT]})
    sources = sources_of(tiny_workdir, 8)
    settings = settings_for(tiny_workdir, shadow_rate=1.0, shadow_model=TEACHER, default_model=STUDENT)

    async def scenario() -> dict[str, Any]:
        async with serving(settings, shadowed) as client:
            for model in ("twin", STUDENT):
                for source in sources:
                    response = await client.post("/translate", json={"q": source, "model": model, **GREEDY})
                    assert response.status_code == 200
            for _ in range(200):  # the shadow runs after the answers; wait for it
                text = (await client.get("/metrics")).text
                if all(metric(text, "wdserve_shadow_chrf_count", model=m) == len(sources)
                       for m in ("twin", STUDENT)):
                    break
                await asyncio.sleep(0.02)
            models = {m["name"]: m for m in (await client.get("/models")).json()}
            return {"metrics": text, "models": models}

    result = run(scenario())
    text, models = result["metrics"], result["models"]
    mean = {m: metric(text, "wdserve_shadow_chrf_sum", model=m)
            / metric(text, "wdserve_shadow_chrf_count", model=m) for m in ("twin", STUDENT)}
    assert mean["twin"] == pytest.approx(100.0)
    assert mean[STUDENT] < 80, mean  # a worse student moves the metric well away from agreement
    assert models["twin"]["shadow"]["identical"] == 1.0
    assert models[STUDENT]["shadow"]["mean_chrf"] == pytest.approx(mean[STUDENT], abs=0.01)
    assert models[STUDENT]["shadow"]["reference"] == TEACHER and models[TEACHER]["shadow"] is None
    # chrF 100 lands only in the last bucket: every twin sentence, no student sentence
    assert metric(text, "wdserve_shadow_chrf_bucket", model="twin", le="99.99") == 0


def test_shadow_work_never_delays_an_answer_and_is_dropped_first(tiny_workdir: Path, registry: ModelRegistry,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(registry.models[TEACHER], monkeypatch)
    settings = settings_for(tiny_workdir, shadow_rate=1.0, shadow_model=TEACHER, shadow_queue_size=1,
                            max_batch_size=1, max_wait_ms=0, **TWO_THREADS)
    student = {"q": SENTENCE, "model": STUDENT, **GREEDY}

    async def answered_while_the_reference_is_held(client: Any) -> None:
        assert (await client.post("/translate", json=student)).status_code == 200
        assert not gate.event.is_set()  # the answer did not wait for its shadow

    async def scenario() -> None:
        async with serving(settings, registry) as client:
            # users keep the reference busy, one request running and a batch's worth queued
            users = [asyncio.create_task(client.post("/translate", json={"q": SENTENCE, "model": TEACHER}))
                     for _ in range(2)]
            await gate.until_entered(1)
            await until_metric(client, "wdserve_queue_depth", 1, model=TEACHER)
            await answered_while_the_reference_is_held(client)
            await until_metric(client, "wdserve_shadow_dropped_total", 1, model=STUDENT, reason="busy")
            gate.open()
            await asyncio.gather(*users)

            gate.close()
            entered = gate.entered
            await answered_while_the_reference_is_held(client)  # its shadow goes to the idle reference
            await gate.until_entered(entered + 1)
            await answered_while_the_reference_is_held(client)  # waits in the shadow queue (one place)
            await answered_while_the_reference_is_held(client)  # finds it full
            await until_metric(client, "wdserve_shadow_dropped_total", 1, model=STUDENT, reason="queue")
            gate.open()
            await until_metric(client, "wdserve_shadow_chrf_count", 2, model=STUDENT)
            shadow = {m["name"]: m for m in (await client.get("/models")).json()}[STUDENT]["shadow"]
            assert shadow["sentences"] == 2 and shadow["dropped_requests"] == 2

    run(scenario())
