"""server.batching.Batcher with a stand-in translate function (no model needed)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from wdserve.server.batching import (
    Batcher,
    BatchStats,
    ClientGone,
    ClientWatch,
    DeadlineExceeded,
    Output,
    QueueFull,
)


class FakeModel:
    """Echoes its input, records every call; optionally slow."""

    def __init__(self, delay_s: float = 0.0):
        self.calls: list[tuple[int, int, int]] = []  # (batch size, beam, max length)
        self.delay_s = delay_s
        self.lock = threading.Lock()

    def __call__(self, batch: list[list[str]], beam_size: int, max_length: int, scores: bool = False,
                 hypotheses: int = 1) -> list[Output]:
        with self.lock:
            self.calls.append((len(batch), beam_size, max_length))
        time.sleep(self.delay_s)
        return [Output(" ".join(pieces).upper(), len(pieces)) for pieces in batch]


async def with_batcher(model: FakeModel, scenario, **options):
    stats: list[BatchStats] = []
    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher("fake", model, executor, on_batch=stats.append, **options)
        batcher.start()
        try:
            return await scenario(batcher), stats
        finally:
            await batcher.stop()


def test_concurrent_requests_share_calls_and_get_their_own_answers() -> None:
    model = FakeModel()

    async def scenario(batcher: Batcher):
        return await asyncio.gather(*[batcher.translate([[f"w{i}"]], 1, 10, timeout_s=5) for i in range(20)])

    results, stats = asyncio.run(with_batcher(model, scenario, max_batch_size=8, max_wait_s=0.05))
    assert [r[0].text for r in results] == [f"W{i}" for i in range(20)]
    assert [s.size for s in stats] == [8, 8, 4]
    assert sum(s.output_tokens for s in stats) == 20


def test_hypotheses_reach_the_model_and_requests_asking_for_more_never_share_a_call() -> None:
    calls: list[tuple] = []

    def n_best(batch, beam_size, max_length, scores, num_hypotheses):
        calls.append((len(batch), num_hypotheses))
        texts = [" ".join(pieces) for pieces in batch]
        return [Output(text, len(pieces), None, [f"{text} #{k}" for k in range(1, num_hypotheses)])
                for text, pieces in zip(texts, batch, strict=True)]

    async def scenario(batcher: Batcher):
        return await asyncio.gather(batcher.translate([["a"]], 1, 10, timeout_s=5),
                                    batcher.translate([["b"]], 1, 10, timeout_s=5, num_hypotheses=3),
                                    batcher.translate([["c"]], 1, 10, timeout_s=5, num_hypotheses=3))

    (plain, b, c), _ = asyncio.run(with_batcher(n_best, scenario, max_batch_size=8, max_wait_s=0.05))
    assert sorted(calls) == [(1, 1), (2, 3)]
    assert (plain[0].text, plain[0].alternatives) == ("a", [])
    assert (b[0].text, b[0].alternatives, c[0].alternatives) == ("b", ["b #1", "b #2"], ["c #1", "c #2"])


def test_token_budget_and_decoding_options_split_batches() -> None:
    model = FakeModel()

    async def scenario(batcher: Batcher):
        return await asyncio.gather(
            batcher.translate([["a"] * 9, ["b"] * 9], 1, 10, timeout_s=5),  # 2 x (9 + </s>) = 20 tokens
            batcher.translate([["c"]], 1, 10, timeout_s=5),  # would make 3 x 10 = 30 > 25
            batcher.translate([["d"]], 4, 10, timeout_s=5),  # other beam size: never mixed in
        )

    results, _ = asyncio.run(with_batcher(model, scenario, max_batch_tokens=25, max_wait_s=0.05))
    assert [len(r) for r in results] == [2, 1, 1]
    assert sorted(model.calls) == [(1, 1, 10), (1, 4, 10), (2, 1, 10)]


def test_full_queue_rejects_at_once() -> None:
    model = FakeModel(delay_s=0.2)

    async def scenario(batcher: Batcher):
        first = asyncio.create_task(batcher.translate([["a"]], 1, 10, timeout_s=5))
        await asyncio.sleep(0.05)  # "a" is running; the queue is empty again
        second = asyncio.create_task(batcher.translate([["b"], ["c"]], 1, 10, timeout_s=5))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull) as rejected:
            await batcher.translate([["d"]], 1, 10, timeout_s=5)
        assert rejected.value.retry_after_s >= 1
        return await first, await second

    (first, second), _ = asyncio.run(with_batcher(model, scenario, queue_size=2, max_batch_size=1,
                                                  max_wait_s=0))
    assert first[0].text == "A" and [r.text for r in second] == ["B", "C"]


def test_a_request_larger_than_the_queue_runs_when_the_queue_is_empty() -> None:
    async def scenario(batcher: Batcher):
        return await batcher.translate([["x"]] * 5, 1, 10, timeout_s=5)

    results, _ = asyncio.run(with_batcher(FakeModel(), scenario, queue_size=2))
    assert len(results) == 5


@pytest.mark.parametrize("late", [[["late"]], [["late"], ["later"]]], ids=["one sentence", "two sentences"])
def test_deadline_in_queue_fails_fast_and_never_reaches_the_model(late: list[list[str]]) -> None:
    model = FakeModel(delay_s=0.3)

    async def scenario(batcher: Batcher):
        blocker = asyncio.create_task(batcher.translate([["slow"]], 1, 10, timeout_s=5))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="did not answer within 0.1 s"):
            await batcher.translate(late, 1, 10, timeout_s=0.1)
        assert time.monotonic() - started < 0.25  # at its deadline, not when the blocker's batch ends
        await blocker
        return None

    asyncio.run(with_batcher(model, scenario, max_batch_size=1, max_wait_s=0))
    assert model.calls == [(1, 1, 10)]  # the timed-out sentence was dropped, not translated


def test_model_error_fails_only_its_batch() -> None:
    calls = []

    def flaky(batch, *options):
        calls.append(batch)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return [Output("ok", 1) for _ in batch]

    async def scenario(batcher: Batcher):
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.translate([["a"]], 1, 10, timeout_s=5)
        return await batcher.translate([["b"]], 1, 10, timeout_s=5)

    results, _ = asyncio.run(with_batcher(flaky, scenario))
    assert results[0].text == "ok"


@pytest.mark.parametrize("bad_outputs", [
    lambda batch: [Output("ok", 1)] * (len(batch) - 1),  # one output short
    lambda batch: [("ok",)] * len(batch),  # not Outputs
])
def test_outputs_that_do_not_fit_the_batch_fail_it_and_the_collector_goes_on(bad_outputs) -> None:
    calls = []

    def faulty(batch, *options):
        calls.append(batch)
        return bad_outputs(batch) if len(calls) == 1 else [Output("ok", 1) for _ in batch]

    async def scenario(batcher: Batcher):
        with pytest.raises(Exception):  # noqa: B017 (whatever the fault, it reaches the request)
            await batcher.translate([["a"], ["b"]], 1, 10, timeout_s=5)
        return await batcher.translate([["c"]], 1, 10, timeout_s=5)

    results, _ = asyncio.run(with_batcher(faulty, scenario))
    assert results[0].text == "ok"


class GatedModel(FakeModel):
    """A FakeModel whose calls wait until the test opens the gate, so a batch stays running on cue."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.running = threading.Event()

    def __call__(self, batch: list[list[str]], *options) -> list[Output]:
        self.running.set()
        self.gate.wait(30)
        return super().__call__(batch, *options)


def test_a_client_leaving_withdraws_its_queued_sentences_and_frees_their_places() -> None:
    model = GatedModel()
    cancelled: list[tuple[str, int]] = []
    connection = ClientWatch()

    async def scenario(batcher: Batcher):
        running = asyncio.create_task(batcher.translate([["a"]], 1, 10, timeout_s=30))
        await asyncio.to_thread(model.running.wait, 30)  # "a" is inside a batch; the queue is empty
        leaving = asyncio.create_task(batcher.translate([["b"], ["c"], ["d"]], 1, 10, timeout_s=30,
                                                        client=connection))
        await asyncio.sleep(0)
        assert batcher.depth == 3
        connection.lost()
        with pytest.raises(ClientGone):
            await leaving
        assert batcher.depth == 0 and cancelled == [("fake", 3)] and not connection.waiting
        # the queue holds 4: the withdrawn sentences' places are free before the collector looks
        later = asyncio.create_task(batcher.translate([["e"]] * 4, 1, 10, timeout_s=30))
        await asyncio.sleep(0)
        model.gate.set()
        return await running, await later

    options = {"queue_size": 4, "max_batch_size": 4, "max_wait_s": 0}
    (first, later), _ = asyncio.run(with_batcher(model, scenario, **options,
                                                 on_cancel=lambda name, n: cancelled.append((name, n))))
    assert first[0].text == "A" and [r.text for r in later] == ["E"] * 4
    assert model.calls == [(1, 1, 10), (4, 1, 10)]  # b, c and d never reached the model


def test_a_sentence_already_running_finishes_but_its_client_is_answered_at_once() -> None:
    model = GatedModel()
    cancelled: list[tuple[str, int]] = []
    connection = ClientWatch()

    async def scenario(batcher: Batcher):
        leaving = asyncio.create_task(batcher.translate([["a"]], 1, 10, timeout_s=30, client=connection))
        await asyncio.to_thread(model.running.wait, 30)
        connection.lost()
        with pytest.raises(ClientGone):
            await leaving  # while its batch still runs
        model.gate.set()
        return await batcher.translate([["b"]], 1, 10, timeout_s=30)

    results, stats = asyncio.run(with_batcher(model, scenario, max_wait_s=0,
                                              on_cancel=lambda name, n: cancelled.append((name, n))))
    assert results[0].text == "B" and [s.size for s in stats] == [1, 1]
    assert cancelled == []  # nothing was withdrawn: the running sentence was translated


def test_a_finished_request_stops_watching_its_client() -> None:
    connection = ClientWatch()

    async def scenario(batcher: Batcher):
        result = await batcher.translate([["a"]], 1, 10, timeout_s=30, client=connection)
        assert not connection.waiting
        connection.lost()  # after the answer: nothing to withdraw, nothing raised
        return result

    results, _ = asyncio.run(with_batcher(FakeModel(), scenario))
    assert results[0].text == "A"
