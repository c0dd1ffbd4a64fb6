"""Shadow translations: a sample of live requests translated again by a reference model (the teacher),
in the background, to measure on real traffic how far the served student's output is from it.

``--shadow-rate 0.05`` picks 5% of the requests answered by any model other than the reference
(``--shadow-model``, default ``teacher``) that translates the same language pair. After the user's
answer is ready, the request's sentences and the student's outputs go into a bounded queue; one
background task sends them to the reference model's batcher, tied to no client, and scores each
student sentence against the reference's with chrF (:func:`chrf`). Scores go to the Prometheus
histogram ``wdserve_shadow_chrf`` {model} and are summarised per model in ``GET /models``.

Shadow work is the first thing dropped under load (``wdserve_shadow_dropped_total`` {model,
reason}): ``queue`` when its queue is full, ``busy`` when the reference's or the student's queue
holds a full batch when the job's turn comes, ``reference`` when the reference refuses it, does not
answer within the request timeout, or fails. It never takes the last places of a queue that users
need, since it only goes in while that queue holds less than a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from wdserve.errors import ConfigError
from wdserve.server.batching import Batcher
from wdserve.server.metrics import ServerMetrics
from wdserve.server.models import ModelRegistry, ServedModel
from wdserve.server.service import Job, Translation
from wdserve.server.settings import ServeSettings

log = logging.getLogger(__name__)

CHRF_ORDER = 6  # character n-grams 1..6 (sacreBLEU's chrF default)
CHRF_BETA = 2  # recall weighs beta^2 = 4 times precision
MAX_JOBS_AT_ONCE = 32  # shadow requests sent to the reference together (its batcher batches them)


def chrf(hypothesis: str, reference: str) -> float:
    """Sentence chrF, 0-100, as sacreBLEU's ``sentence_chrf`` computes it (chrF2, character 6-grams,
    whitespace removed, no word n-grams): per order n, n-gram precision and recall; both averaged over
    the orders that both strings have; then the F-score with recall weighted ``beta^2``.

    Written out here so that the serving install needs no sacreBLEU (nor its lxml, regex, ...); a
    test checks it against sacreBLEU.
    """
    hyp, ref = "".join(hypothesis.split()), "".join(reference.split())
    precision = recall = 0.0
    orders = 0
    for n in range(1, CHRF_ORDER + 1):
        ref_grams = Counter(ref[i : i + n] for i in range(len(ref) - n + 1))
        hyp_grams = Counter(hyp[i : i + n] for i in range(len(hyp) - n + 1))
        hyp_count, ref_count = sum(hyp_grams.values()), sum(ref_grams.values())
        if not hyp_count or not ref_count:  # an order one string is too short for does not count
            continue
        matches = sum(min(count, ref_grams[gram]) for gram, count in hyp_grams.items() if gram in ref_grams)
        precision += matches / hyp_count
        recall += matches / ref_count
        orders += 1
    if not orders or not precision + recall:
        return 0.0
    precision, recall = precision / orders, recall / orders
    factor = CHRF_BETA ** 2
    return 100 * (1 + factor) * precision * recall / (factor * precision + recall)


@dataclass
class ShadowJob:
    model: str  # the served model that answered the user
    sources: list[str]  # the request's sentences
    outputs: list[str]  # that model's translations of them
    beam_size: int
    max_length: int


@dataclass
class Agreement:
    """One model's agreement with the reference so far, for /models."""

    sentences: int = 0
    chrf_sum: float = 0.0
    identical: int = 0
    dropped: int = 0  # shadow requests dropped, whatever the reason

    def describe(self, reference: str, rate: float) -> dict[str, Any]:
        return {"reference": reference, "rate": rate, "sentences": self.sentences,
                "mean_chrf": round(self.chrf_sum / self.sentences, 2) if self.sentences else None,
                "identical": round(self.identical / self.sentences, 4) if self.sentences else None,
                "dropped_requests": self.dropped}


class Shadow:
    def __init__(self, rate: float, reference: ServedModel, registry: ModelRegistry,
                 batchers: dict[str, Batcher], metrics: ServerMetrics, queue_size: int, timeout_s: float,
                 sample: Callable[[], float] = random.random) -> None:
        self.rate = rate
        self.reference = reference
        self.batchers = batchers
        self.metrics = metrics
        self.timeout_s = timeout_s
        self._sample = sample
        self._queue: asyncio.Queue[ShadowJob] = asyncio.Queue(maxsize=queue_size)
        self._task: asyncio.Task | None = None
        self.agreement = {name: Agreement() for name, served in registry.models.items()
                          if self.covers(served)}

    def covers(self, served: Any) -> bool:
        """Whether requests answered by ``served`` are shadowed: another plain model of the same pair."""
        return (isinstance(served, ServedModel) and served.name != self.reference.name
                and (served.source_lang, served.target_lang)
                == (self.reference.source_lang, self.reference.target_lang))

    def offer(self, served: Any, job: Job, result: Translation) -> None:
        """Called once the user's answer is ready: queues the request for the reference, at ``rate``."""
        if served.name not in self.agreement or self._sample() >= self.rate:
            return
        sentences = result.sentences
        shadow = ShadowJob(served.name, [s.source for s in sentences], [s.text for s in sentences],
                           job.beam_size, job.max_length)
        try:
            self._queue.put_nowait(shadow)
        except asyncio.QueueFull:
            self._drop(shadow, "queue")

    def describe(self, name: str) -> dict[str, Any] | None:
        """The /models summary of ``name``'s agreement with the reference (None when not shadowed)."""
        agreement = self.agreement.get(name)
        return agreement.describe(self.reference.name, self.rate) if agreement else None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="shadow")

    async def stop(self) -> None:
        """Ends the background task; shadow requests still queued are dropped (uncounted)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _drop(self, job: ShadowJob, reason: str) -> None:
        self.agreement[job.model].dropped += 1
        self.metrics.observe_shadow_dropped(job.model, reason)

    async def _run(self) -> None:
        while True:
            jobs = [await self._queue.get()]
            while len(jobs) < MAX_JOBS_AT_ONCE and not self._queue.empty():
                jobs.append(self._queue.get_nowait())
            await asyncio.gather(*[self._compare(job) for job in jobs])

    def _busy(self, job: ShadowJob) -> bool:
        return any(batcher.depth >= batcher.max_batch_size
                   for batcher in (self.batchers[self.reference.name], self.batchers[job.model]))

    async def _compare(self, job: ShadowJob) -> None:
        if self._busy(job):
            self._drop(job, "busy")
            return
        reference = self.reference
        pieces = [reference.encode(source) for source in job.sources]
        max_length = job.max_length
        if reference.max_positions:
            if any(len(p) + 1 > reference.max_positions for p in pieces):
                self._drop(job, "reference")
                return
            max_length = min(max_length, reference.max_positions)
        try:
            results = await self.batchers[reference.name].translate(pieces, job.beam_size, max_length,
                                                                    self.timeout_s)
        except Exception as err:  # QueueFull, DeadlineExceeded, a model fault: the user never waits on it
            log.debug("shadow request of %s dropped: %s: %s", job.model, type(err).__name__, err)
            self._drop(job, "reference")
            return
        scores = [chrf(output, result.text) for output, result in zip(job.outputs, results, strict=True)]
        agreement = self.agreement[job.model]
        agreement.sentences += len(scores)
        agreement.chrf_sum += sum(scores)
        agreement.identical += sum(output == result.text for output, result in zip(job.outputs, results,
                                                                                     strict=True))
        self.metrics.observe_shadow(job.model, scores)


def reference_model(settings: ServeSettings, registry: ModelRegistry) -> ServedModel | None:
    """The model shadow requests go to; None when shadowing is off (raises ConfigError when not served)."""
    if settings.shadow_rate <= 0:
        return None
    reference = registry.resolve(settings.shadow_model)
    if reference is None:
        raise ConfigError(f"shadow_model {settings.shadow_model!r} is not served; served: "
                          f"{', '.join(registry.names())}")
    return reference


def build_shadow(settings: ServeSettings, registry: ModelRegistry, batchers: dict[str, Batcher],
                 metrics: ServerMetrics) -> Shadow | None:
    """The server's shadow, or None when ``shadow_rate`` is 0."""
    reference = reference_model(settings, registry)
    if reference is None:
        return None
    return Shadow(settings.shadow_rate, reference, registry, batchers, metrics, settings.shadow_queue_size,
                  settings.request_timeout_s)
