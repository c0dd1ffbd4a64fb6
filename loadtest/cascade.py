"""The cascade (``server.cascade``) in the bench: BLEU against speed at several thresholds.

Each threshold is one point of the Pareto view, measured as every other point there is: direct
CTranslate2 on the server's cores and threads, the same sentences, batches of
``--direct-batch-size``. A cascade's pass is the student over every sentence, with scores, then
the teacher over the sentences whose confidence is below the threshold; its sentences/s is the
test set over the time of both passes. The same thresholds then go through the served cascade
over HTTP, so the report also gives the BLEU the service delivers.

Default thresholds are the student's confidences at which 5, 10, 15, 20, 30 and 50% of the test
sentences would go to the teacher, so the points spread over the range whatever the models. The
sentences a student is least sure of are its longest and hardest, so the teacher's share of the
time is larger than its share of the sentences (about twice on the tiny run).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

from wdserve.artifacts import ExportDir
from wdserve.loadtest.baselines import DirectTranslator, quality
from wdserve.server.confidence import confidence

log = logging.getLogger("wdserve.bench")

CASCADE_NAME = "bench-cascade"  # the name the bench serves its cascade under
AUTO_FALLBACK_SHARES = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5)  # most resolution where a cascade can pay
GAP_TARGET = 0.5  # issue #19: close at least half of the student's BLEU gap to the teacher ...
SPEED_TARGET = 1.5  # ... while keeping at least 1.5x the teacher's throughput


def timed(run: Callable[[], Any], min_seconds: float) -> tuple[Any, float]:
    """``run()``'s first result and its median seconds per call, repeating it for at least ``min_seconds``
    (the median: on a shared machine a burst of other work lands in a few calls, not in all)."""
    started = time.perf_counter()
    result = run()
    seconds = [time.perf_counter() - started]
    while time.perf_counter() - started < min_seconds:
        call = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - call)
    return result, statistics.median(seconds)


def auto_thresholds(confidences: list[float],
                    shares: tuple[float, ...] = AUTO_FALLBACK_SHARES) -> list[float]:
    """Thresholds below which about ``shares`` of the sentences fall."""
    ordered = sorted(confidences)
    return sorted({ordered[min(len(ordered) - 1, int(share * len(ordered)))] for share in shares})


def measure_direct_cascade(student_export: ExportDir, teacher_export: ExportDir, sentences: list[str],
                           references: list[str], beam_size: int, max_length: int,
                           thresholds: list[float] | None, batch_size: int, threads: int,
                           min_seconds: float) -> dict[str, Any]:
    """The cascade of the two exports at each threshold, without HTTP: fallback share, sentences/s,
    BLEU and chrF."""
    student = DirectTranslator(student_export, threads=threads)
    teacher = DirectTranslator(teacher_export, threads=threads)
    for translator in (student, teacher):  # warm-up: first-call costs
        translator.translate(sentences[:2], beam_size, max_length, batch_size)
    (student_outputs, log_probs), student_s = timed(
        lambda: student.translate_scored(sentences, beam_size, max_length, batch_size), min_seconds)
    confidences = [confidence(lp) for lp in log_probs]
    thresholds = sorted(thresholds) if thresholds else auto_thresholds(confidences)
    points = []
    for threshold in thresholds:
        unsure = [i for i, score in enumerate(confidences) if score < threshold]
        outputs = list(student_outputs)
        teacher_s = 0.0
        if unsure:
            subset = [sentences[i] for i in unsure]
            rewritten, teacher_s = timed(lambda subset=subset: teacher.translate(
                subset, beam_size, max_length, batch_size), min_seconds)
            for i, text in zip(unsure, rewritten, strict=True):
                outputs[i] = text
        points.append({"threshold": threshold, "fallback_share": round(len(unsure) / len(sentences), 4),
                       "sentences_per_s": round(len(sentences) / (student_s + teacher_s), 3),
                       **quality(outputs, references)})
        log.info("direct cascade %s -> %s below %.4f: %.0f%% to the teacher, %.1f sentences/s, BLEU %.2f",
                 student_export.dir_name, teacher_export.dir_name, threshold,
                 100 * points[-1]["fallback_share"], points[-1]["sentences_per_s"], points[-1]["bleu"])
    return {"student": student_export.dir_name, "teacher": teacher_export.dir_name,
            "student_confidence": {"min": round(min(confidences), 4), "median": round(
                sorted(confidences)[len(confidences) // 2], 4), "max": round(max(confidences), 4)},
            "points": points}


def served_cascade_quality(post: Callable[[dict[str, Any]], dict[str, Any]], sentences: list[str],
                           references: list[str], thresholds: list[float], request: dict[str, Any],
                           teacher: str, chunk: int = 32) -> list[dict[str, Any]]:
    """The test set through the served cascade at each threshold (``post`` sends one /translate body
    with ``request``'s options): BLEU, chrF and the share of sentences ``teacher`` (its served name)
    wrote."""
    served = []
    for threshold in thresholds:
        outputs, sentence_models = [], []
        for start in range(0, len(sentences), chunk):
            body = post({**request, "q": sentences[start : start + chunk], "model": CASCADE_NAME,
                         "cascade_threshold": threshold})
            outputs += body["translatedText"]
            sentence_models += [s["model"] for text in body["sentences"] for s in text]
        share = sum(model == teacher for model in sentence_models) / len(sentence_models)
        served.append({"threshold": threshold, "fallback_share": round(share, 4),
                       **quality(outputs, references)})
    return served


def summarize(direct: dict[str, Any], served: list[dict[str, Any]] | None, teacher: dict[str, Any],
              student: dict[str, Any]) -> dict[str, Any]:
    """Each threshold against the two ends: the share of the student's BLEU gap it closes and its speed
    over the teacher's (direct figures of the same exports); and issue #19's target."""
    gap = teacher["bleu"] - student["bleu"]
    by_threshold = {s["threshold"]: s for s in served or []}
    points = []
    for point in direct["points"]:
        served_point = by_threshold.get(point["threshold"])
        points.append({
            **point,
            "gap_closed": round((point["bleu"] - student["bleu"]) / gap, 4) if gap > 0 else None,
            "speed_over_teacher": round(point["sentences_per_s"] / teacher["sentences_per_s"], 4),
            "share_of_student_speed": round(point["sentences_per_s"] / student["sentences_per_s"], 4),
            "served_bleu": served_point["bleu"] if served_point else None,
            "served_fallback_share": served_point["fallback_share"] if served_point else None,
        })
    meeting = [p for p in points if p["gap_closed"] is not None and p["gap_closed"] >= GAP_TARGET
               and p["speed_over_teacher"] >= SPEED_TARGET]
    return {**direct, "teacher_bleu": teacher["bleu"], "student_bleu": student["bleu"],
            "teacher_sentences_per_s": teacher["sentences_per_s"],
            "student_sentences_per_s": student["sentences_per_s"], "points": points,
            "meets_target": [p["threshold"] for p in meeting] if gap > 0 else None}
