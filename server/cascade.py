"""A cascade: a served name that translates with a student first and asks the teacher only where the
student was unsure.

``--cascade fast=student,teacher --cascade-threshold 0.5``: a request for ``fast`` is translated by
``student``, with scores; each sentence whose confidence (``server.confidence``) is below the
threshold is translated again by ``teacher`` and the teacher's output replaces it. The response says
which model wrote each sentence; ``wdserve_cascade_sentences_total`` counts the outcomes.

The teacher's part rides the teacher's own batcher, under the same client watch, so a client that
leaves withdraws its fallback sentences too (499). It is skipped, and the student's sentence kept
(outcome ``degraded``), when it would make the request fail or wait behind a backlog: when the
teacher's queue already holds a full batch, is full, or does not answer within what is left of the
request's timeout, or fails. So under overload the cascade becomes the student alone, never a 503
or 504 of the teacher's making.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from wdserve.errors import ConfigError
from wdserve.server.batching import ClientGone, ClientWatch, DeadlineExceeded, QueueFull, SentenceResult
from wdserve.server.confidence import confidence
from wdserve.server.models import ModelRegistry, ServedModel
from wdserve.server.service import (
    CLIENT_CLOSED_REQUEST,
    ApiError,
    Job,
    Sentence,
    ServerState,
    Translation,
    assemble,
    encode_sentences,
    split_job,
    translate_sentences,
)
from wdserve.server.settings import ServeSettings

log = logging.getLogger(__name__)

# outcomes of a cascade's sentence, the label of wdserve_cascade_sentences_total
CONFIDENT, FALLBACK, DEGRADED = "student", "teacher", "degraded"


class CascadeError(ConfigError):
    """A cascade that cannot be served: unknown model, clashing name, different language pairs."""


@dataclass
class Cascade:
    name: str
    student: ServedModel
    teacher: ServedModel
    threshold: float  # a sentence whose student confidence is below it goes to the teacher

    @property
    def source_lang(self) -> str | None:
        return self.student.source_lang

    @property
    def target_lang(self) -> str | None:
        return self.student.target_lang

    def supports(self, source: str | None, target: str | None) -> bool:
        return self.student.supports(source, target) and self.teacher.supports(source, target)

    def describe(self) -> dict[str, Any]:
        """The cascade's entry in /models."""
        return {"name": self.name, "source_lang": self.source_lang, "target_lang": self.target_lang,
                "method": "cascade", "quantization": None, "parameters": None, "path": None,
                "cascade": {"student": self.student.name, "teacher": self.teacher.name,
                            "threshold": self.threshold}}

    async def translate(self, state: ServerState, job: Job, client: ClientWatch | None) -> Translation:
        started = time.perf_counter()
        threshold = self.threshold if job.cascade_threshold is None else job.cascade_threshold
        split = split_job(job)
        sources = split.sentences
        pieces, max_length = encode_sentences(self.student, sources, job.max_length)
        first = await translate_sentences(state, self.student, pieces, job, max_length, client, scores=True)
        scores = [confidence(result.log_prob) for result in first]
        state.metrics.observe_confidence(self.student.name, scores)
        sentences = [Sentence(source, result.text, self.student.name, result.output_tokens,
                              result.log_prob if job.confidence else None)
                     for source, result in zip(sources, first, strict=True)]
        unsure = [i for i, score in enumerate(scores) if score < threshold]
        second = await self._fallback(state, job, [sources[i] for i in unsure], client, started) \
            if unsure else []
        for i, result in zip(unsure, second or (), strict=False):
            sentences[i] = Sentence(sources[i], result.text, self.teacher.name, result.output_tokens,
                                    result.log_prob)
        fallbacks = len(second) if second else 0
        state.metrics.observe_cascade(self.name, {CONFIDENT: len(sources) - len(unsure), FALLBACK: fallbacks,
                                                  DEGRADED: len(unsure) - fallbacks})
        translation = assemble(self.name, split, sentences, started, first + (second or []))
        if second:  # the two models ran one after the other
            compute_s = max(r.compute_s for r in first) + max(r.compute_s for r in second)
            translation.translate_ms = compute_s * 1000
        return translation

    async def _fallback(self, state: ServerState, job: Job, sources: list[str], client: ClientWatch | None,
                        started: float) -> list[SentenceResult] | None:
        """The teacher's translations of ``sources``, or None where the cascade degrades to the student."""
        batcher = state.batchers[self.teacher.name]
        left_s = state.settings.request_timeout_s - (time.perf_counter() - started)
        if batcher.depth >= batcher.max_batch_size or left_s <= 0:
            return None
        try:
            pieces, max_length = encode_sentences(self.teacher, sources, job.max_length)
            results = await batcher.translate(pieces, job.beam_size, max_length, left_s, client=client,
                                              scores=job.confidence)
        except ClientGone as err:
            raise ApiError(CLIENT_CLOSED_REQUEST, str(err)) from err
        except (QueueFull, DeadlineExceeded, ApiError) as err:
            log.debug("cascade %s keeps the student's sentences: %s", self.name, err)
            return None
        except Exception:  # a teacher fault costs this request its fallback, not its answer
            log.exception("cascade %s: the teacher failed; the student's sentences are kept", self.name)
            return None
        if job.confidence:
            state.metrics.observe_confidence(self.teacher.name,
                                             [confidence(result.log_prob) for result in results])
        return results


def build_cascades(settings: ServeSettings, registry: ModelRegistry) -> dict[str, Cascade]:
    """Every configured cascade, its models resolved in ``registry`` (raises CascadeError)."""
    cascades = {}
    for name, (student_name, teacher_name) in settings.cascades.items():
        if registry.resolve(name) is not None:
            raise CascadeError(f"cascade {name!r}: the name is already a served model or alias; "
                               "choose another")
        models = []
        for role, wanted in (("student", student_name), ("teacher", teacher_name)):
            served = registry.resolve(wanted)
            if served is None:
                raise CascadeError(f"cascade {name!r}: its {role} {wanted!r} is not served; served: "
                                   f"{', '.join(registry.names())}")
            models.append(served)
        student, teacher = models
        if (student.source_lang, student.target_lang) != (teacher.source_lang, teacher.target_lang):
            raise CascadeError(f"cascade {name!r}: {student.name} translates {student.source_lang} -> "
                               f"{student.target_lang} but {teacher.name} {teacher.source_lang} -> "
                               f"{teacher.target_lang}")
        cascades[name] = Cascade(name, student, teacher, settings.cascade_threshold)
    return cascades


def choose_cascade(state: ServerState, name: str | None, source: str, target: str | None) -> Cascade | None:
    """The cascade a request names (or the default model, when that is a cascade), else None."""
    cascade = state.cascades.get(name if name is not None else state.settings.default_model)
    if cascade is not None and not cascade.supports(source, target):
        if name is None:  # the default does not fit this pair: the ordinary choice finds one that does
            return None
        raise ApiError(400, f"cascade {cascade.name!r} translates {cascade.source_lang} -> "
                            f"{cascade.target_lang}, not {source} -> {target}")
    return cascade
