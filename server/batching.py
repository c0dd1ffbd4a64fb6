"""Per-model dynamic batching: many small requests become one translate_batch call.

Each model has one :class:`Batcher`. Requests put their sentences into a bounded
queue (counted in sentences) and await one future per sentence. A collector task
takes the oldest sentence, waits at most ``max_wait_s`` for company, then takes
every queued sentence with the same decoding options (beam size, max length, number of
hypotheses) up to
``max_batch_size`` sentences and ``max_batch_tokens`` padded source tokens, and runs
the blocking CTranslate2 call in a shared thread pool. While one batch runs, the
next one fills, so a burst of N single-sentence requests costs about N / batch size
calls instead of N.

Admission is all-or-nothing: a request whose sentences do not fit raises
:class:`QueueFull` (HTTP 503) at once instead of letting the queue grow. A request
larger than the whole queue is admitted only when the queue is empty, so it cannot
starve. Sentences whose deadline passes while queued are dropped with
:class:`DeadlineExceeded` (HTTP 504) and never reach the model.

A request that ends early (its client went away, its deadline passed) withdraws its
sentences still in the queue: they free their places at once and are never
translated; one already inside a running batch finishes, its result unused. Given its
client's :class:`ClientWatch`, a request ends with :class:`ClientGone` as soon as the
client leaves; the sentences it withdrew are reported to ``on_cancel``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import NamedTuple

log = logging.getLogger(__name__)

class Output(NamedTuple):
    """One sentence as the model translated it."""

    text: str
    tokens: int  # output token count
    log_prob: float | None = None  # mean log-probability per output token, when scores were asked for
    alternatives: Sequence[str] = ()  # the other n-best outputs' texts, best first, when asked for


# (batch of source pieces, beam_size, max_length, return_scores, num_hypotheses) -> one Output per
# sentence; return_scores is True for a batch in which some request asked for scores
TranslateFn = Callable[[list[list[str]], int, int, bool, int], list[Output]]


class QueueFull(Exception):
    """The model's queue has no room; retry after ``retry_after_s`` seconds."""

    def __init__(self, model: str, retry_after_s: int):
        super().__init__(f"model {model!r} is overloaded (queue full); retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class DeadlineExceeded(Exception):
    """A request waited longer than its deadline."""


class ClientGone(Exception):
    """The request's client disconnected before its sentences were translated."""


class ClientWatch:
    """A client connection as the batcher sees it: ``lost()`` fails the requests waiting on it.

    Whoever learns of the disconnect calls ``lost()`` (``server.protocol`` keeps one per
    connection). The batcher registers a request by appending its list of futures to
    ``waiting`` and removes it when the request ends: no object is allocated per request,
    since every allocation brings the next garbage collection of the young requests closer.
    """

    __slots__ = ("waiting",)

    def __init__(self) -> None:
        self.waiting: list[list[asyncio.Future]] = []

    def lost(self) -> None:
        error = ClientGone("the client left before its sentences were translated")
        for futures in self.waiting:
            for future in futures:
                if not future.done():
                    future.set_exception(error)
        self.waiting.clear()

    def stop(self) -> None:
        """The request is done with the watch (a watch that runs a task ends it here)."""


@dataclass
class SentenceResult:
    text: str
    queued_s: float  # from submission to the start of its batch
    compute_s: float  # duration of its batch
    output_tokens: int
    log_prob: float | None = None  # mean log-probability per output token, when scores were asked for
    alternatives: list[str] = field(default_factory=list)  # the next best outputs, when asked for


@dataclass
class _Item:
    pieces: list[str]
    key: tuple[int, int, int]  # (beam_size, max_length, num_hypotheses): only equal keys share a batch
    deadline: float
    future: asyncio.Future = field(repr=False)
    enqueued: float = field(default_factory=time.monotonic)
    # in the queue and counted in depth; whoever sets it False (batch, expiry, withdrawal) uncounts it
    queued: bool = True
    scores: bool = False  # its request wants the model's score (a batch asks when any item does)


@dataclass
class BatchStats:
    """What one translate_batch call did; handed to the observer (metrics)."""

    model: str
    size: int
    padded_tokens: int
    output_tokens: int
    seconds: float


class Batcher:
    def __init__(self, model: str, translate: TranslateFn, executor: Executor, *, max_batch_size: int = 32,
                 max_batch_tokens: int = 4096, max_wait_s: float = 0.005, queue_size: int = 256,
                 on_batch: Callable[[BatchStats], None] | None = None,
                 on_queue: Callable[[str, int], None] | None = None,
                 on_cancel: Callable[[str, int], None] | None = None):
        self.model = model
        self._translate = translate
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.queue_size = queue_size
        self._on_batch = on_batch or (lambda stats: None)
        self._on_queue = on_queue or (lambda model, depth: None)
        self._on_cancel = on_cancel or (lambda model, sentences: None)
        # withdrawn items stay in the deque until the collector passes them; _waiting counts the rest
        self._queue: deque[_Item] = deque()
        self._waiting = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._last_batch_s = 0.05

    @property
    def depth(self) -> int:
        """Sentences waiting for a batch (withdrawn ones not counted)."""
        return self._waiting

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.model}")

    async def stop(self) -> None:
        """Cancels the collector and fails whatever is still queued (nothing, after a graceful drain)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._queue:
            item = self._queue.popleft()
            item.queued = False
            if not item.future.done():
                item.future.set_exception(QueueFull(self.model, 1))
        self._waiting = 0
        self._on_queue(self.model, 0)

    def retry_after(self) -> int:
        """Seconds until the current queue is likely drained (at least 1)."""
        batches = math.ceil(self.depth / self.max_batch_size)
        return max(1, math.ceil(batches * self._last_batch_s))

    async def translate(self, batch: list[list[str]], beam_size: int, max_length: int, timeout_s: float,
                        client: ClientWatch | None = None, scores: bool = False,
                        num_hypotheses: int = 1) -> list[SentenceResult]:
        """Queues every sentence of one request and waits for all of them (or raises).

        Raises :class:`ClientGone` when ``client`` is lost first. With ``scores`` each result
        carries the model's mean token log-probability (``log_prob``); with ``num_hypotheses`` > 1,
        the next best outputs of the model's n-best list (``alternatives``).
        """
        if not batch:
            return []
        if self._waiting + len(batch) > self.queue_size and (self._waiting or len(batch) <= self.queue_size):
            raise QueueFull(self.model, self.retry_after())
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout_s
        key = (beam_size, max_length, num_hypotheses)
        items = [_Item(pieces, key, deadline, loop.create_future(), scores=scores) for pieces in batch]
        self._queue.extend(items)
        self._waiting += len(items)
        self._on_queue(self.model, self._waiting)
        self._wakeup.set()
        futures = [item.future for item in items]
        # a timer that fails the futures costs less than wait_for's extra future and callbacks
        timer = loop.call_later(timeout_s, self._expire, futures, timeout_s)
        if client is not None:
            client.waiting.append(futures)
        try:
            if len(futures) == 1:  # most requests: no gather either
                return [await futures[0]]
            return await asyncio.gather(*futures)
        except ClientGone:
            self._withdraw(items, cancelled=True)
            raise
        finally:
            timer.cancel()
            if client is not None:
                try:  # noqa: SIM105 (contextlib.suppress would allocate an object per request)
                    client.waiting.remove(futures)
                except ValueError:  # lost() has emptied the list already
                    pass
            self._withdraw(items, cancelled=False)

    def _expire(self, futures: list[asyncio.Future], timeout_s: float) -> None:
        self._fail(futures, DeadlineExceeded(f"model {self.model!r} did not answer within {timeout_s:g} s"))

    def _withdraw(self, items: list[_Item], cancelled: bool) -> None:
        """Takes a finished request's items out of the queue count and cancels those still pending."""
        withdrawn = 0
        for item in items:
            if item.queued:
                item.queued = False
                withdrawn += 1
            if not item.future.done():
                item.future.cancel()
        if withdrawn:
            self._waiting -= withdrawn
            self._on_queue(self.model, self._waiting)
            if cancelled:
                self._on_cancel(self.model, withdrawn)

    @staticmethod
    def _fail(futures: list[asyncio.Future], error: Exception) -> None:
        for future in futures:
            if not future.done():
                future.set_exception(error)

    def _take_batch(self) -> list[_Item]:
        """Removes the next batch from the queue: oldest item's key, size and token budget respected."""
        now = time.monotonic()
        key = None
        batch: list[_Item] = []
        longest = 0
        kept: deque[_Item] = deque()
        while self._queue:
            item = self._queue.popleft()
            if not item.queued or item.future.done():  # withdrawn, or failed (its request withdraws it next)
                continue
            if item.deadline <= now:
                item.queued = False
                self._waiting -= 1
                item.future.set_exception(DeadlineExceeded(f"model {self.model!r}: deadline passed in queue"))
                continue
            if key is None:
                key = item.key
            new_longest = max(longest, len(item.pieces) + 1)
            fits = (item.key == key and len(batch) < self.max_batch_size
                    and (not batch or new_longest * (len(batch) + 1) <= self.max_batch_tokens))
            if fits:
                item.queued = False
                batch.append(item)
                longest = new_longest
            else:
                kept.append(item)
            if len(batch) >= self.max_batch_size:
                break
        kept.extend(self._queue)
        self._queue = kept
        self._waiting -= len(batch)
        self._on_queue(self.model, self._waiting)
        return batch

    def _oldest_waiting(self) -> _Item | None:
        """The oldest item still waiting, after dropping withdrawn ones from the front of the queue."""
        while self._queue and not self._queue[0].queued:
            self._queue.popleft()
        return self._queue[0] if self._queue else None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            oldest = self._oldest_waiting()
            if oldest is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # let the batch fill up, but never hold the oldest sentence longer than max_wait_s
            wait = oldest.enqueued + self.max_wait_s - time.monotonic()
            while wait > 0 and self._waiting < self.max_batch_size:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout=wait)
                except asyncio.TimeoutError:
                    break
                oldest = self._oldest_waiting()
                wait = oldest.enqueued + self.max_wait_s - time.monotonic() if oldest else 0
            batch = self._take_batch()
            if batch:
                try:
                    await self._run_batch(loop, batch)
                except Exception as err:  # a model fault fails its batch, not the collector
                    log.exception("model %s: translate_batch failed for %d sentences", self.model, len(batch))
                    self._fail([item.future for item in batch], err)

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Item]) -> None:
        beam_size, max_length, num_hypotheses = batch[0].key
        scored = any(item.scores for item in batch)
        started = time.monotonic()
        outputs = await loop.run_in_executor(
            self._executor, self._translate, [item.pieces for item in batch], beam_size, max_length, scored,
            num_hypotheses)
        if len(outputs) != len(batch):  # checked before any request is answered from a misaligned list
            raise RuntimeError(f"{len(outputs)} outputs for {len(batch)} sentences")
        seconds = time.monotonic() - started
        self._last_batch_s = seconds
        output_tokens = 0
        for item, output in zip(batch, outputs, strict=True):
            output_tokens += output.tokens
            if not item.future.done():
                item.future.set_result(SentenceResult(
                    output.text, started - item.enqueued, seconds, output.tokens, output.log_prob,
                    list(output.alternatives)))
        padded = len(batch) * max(len(item.pieces) + 1 for item in batch)
        self._on_batch(BatchStats(self.model, len(batch), padded, output_tokens, seconds))
