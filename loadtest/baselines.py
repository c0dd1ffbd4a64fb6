"""The same sentences without HTTP: direct CTranslate2 and the PyTorch teacher, and their quality.

These are the two reference points of the report: direct CTranslate2 is what the
server could do at best (server efficiency = HTTP throughput / direct throughput),
and the PyTorch teacher is what a user would get without export and students.
Words are counted as in the locustfile: whitespace-separated words of the output.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any

from wdserve.artifacts import ExportDir, translate_corpus
from wdserve.distill.evaluate import score

log = logging.getLogger("wdserve.bench")


def quality(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacreBLEU defaults) of detokenized text."""
    result = score(hypotheses, references)
    return {"bleu": result["bleu"], "chrf": result["chrf"]}


def word_count(texts: list[str]) -> int:
    return sum(len(text.split()) for text in texts)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100), at least 1
    return ordered[int(rank) - 1]


class DirectTranslator:
    """CTranslate2 + the export's SentencePiece model(s), called the way the server calls them, minus HTTP."""

    def __init__(self, export: ExportDir, threads: int = 0) -> None:
        import ctranslate2

        from wdserve.pieces import Tokenizer

        self.tokenizer = Tokenizer.for_export(export)
        self.translator = ctranslate2.Translator(str(export.path), device="cpu", intra_threads=threads)
        self.max_positions = export.max_positions

    def translate(self, sentences: list[str], beam_size: int, max_length: int, batch_size: int,
                  sort_by_length: bool = True) -> list[str]:
        """Batches of ``batch_size`` sentences, each held to the server's per-sentence output limit: of
        similar length, as CTranslate2's own ``max_batch_size`` would make them, or in the given order,
        as requests arrive at the server (``sort_by_length=False``)."""
        return self._translate(sentences, beam_size, max_length, batch_size, sort_by_length, False)[0]

    def translate_scored(self, sentences: list[str], beam_size: int, max_length: int,
                         batch_size: int) -> tuple[list[str], list[float]]:
        """``translate``, with each output's mean token log-probability (``server.confidence``)."""
        return self._translate(sentences, beam_size, max_length, batch_size, True, True)

    def _translate(self, sentences: list[str], beam_size: int, max_length: int, batch_size: int,
                   sort_by_length: bool, return_scores: bool) -> tuple[list[str], list[float]]:
        pieces = [self.tokenizer.source_pieces(sentence) for sentence in sentences]
        outputs: list[str] = [""] * len(pieces)
        log_probs: list[float] = [0.0] * len(pieces)
        batches = translate_corpus(self.translator, pieces, beam_size, batch_size, max_length,
                                   max_positions=self.max_positions, sort_by_length=sort_by_length,
                                   source_end=self.tokenizer.source_end, return_scores=return_scores)
        for indices, hypotheses in batches:
            for i, hypothesis in zip(indices, hypotheses, strict=True):
                if return_scores:  # a Hypothesis: pieces and score
                    log_probs[i] = hypothesis.log_prob
                    hypothesis = hypothesis.tokens
                outputs[i] = self.tokenizer.decode(hypothesis)
        return outputs, log_probs


def measure_direct(
    export: ExportDir,
    sentences: list[str],
    references: list[str],
    beam_size: int,
    max_length: int,
    batch_size: int = 32,
    latency_sentences: int = 50,
    threads: int = 0,
    min_seconds: float = 0.0,
) -> dict[str, Any]:
    """Batched throughput and one-sentence latency of ``export`` over ``sentences``, plus BLEU/chrF.

    The batched pass over ``sentences`` is repeated until ``min_seconds`` have passed, so a
    small test set still gives a stable rate; BLEU and chrF are those of the first pass.
    """
    translator = DirectTranslator(export, threads=threads)
    translator.translate(sentences[:2], beam_size, max_length, batch_size)  # warm-up: first-call costs
    started = time.perf_counter()
    outputs = translator.translate(sentences, beam_size, max_length, batch_size)
    passes = 1
    while time.perf_counter() - started < min_seconds:
        translator.translate(sentences, beam_size, max_length, batch_size)
        passes += 1
    seconds = time.perf_counter() - started
    latencies = []
    for sentence in sentences[:latency_sentences]:
        one = time.perf_counter()
        translator.translate([sentence], beam_size, max_length, 1)
        latencies.append((time.perf_counter() - one) * 1000)
    tokens = word_count(outputs)
    return {
        "export": export.dir_name,
        "name": export.info.name,
        "method": export.info.method,
        "quantization": export.info.quantization,
        "parameters": export.info.parameters,
        "sentences": len(sentences),
        "batch_size": batch_size,
        "passes": passes,
        "seconds": round(seconds, 4),
        "sentences_per_s": round(passes * len(sentences) / seconds, 3),
        "tokens_per_s": round(passes * tokens / seconds, 3),
        "tokens": tokens,
        "latency_sentences": len(latencies),
        "p50_ms": round(percentile(latencies, 50), 3),
        "p95_ms": round(percentile(latencies, 95), 3),
        "p99_ms": round(percentile(latencies, 99), 3),
        "mean_ms": round(statistics.fmean(latencies), 3),
        **quality(outputs, references),
    }


def measure_direct_cpu(export: ExportDir, sentences: list[str], beam_size: int, max_length: int,
                       batch_size: int, threads: int, min_seconds: float) -> dict[str, Any]:
    """Direct CTranslate2 priced as the server is: process CPU time per sentence (and sentences/s) for
    batches of ``batch_size`` in arrival order, i.e. unsorted, as the server's batcher forms them.

    The pass over ``sentences`` is repeated until ``min_seconds`` have passed.
    """
    translator = DirectTranslator(export, threads=threads)
    translator.translate(sentences[:2], beam_size, max_length, batch_size)  # warm-up: first-call costs
    passes = 0
    wall, cpu = time.perf_counter(), time.process_time()
    while passes == 0 or time.perf_counter() - wall < min_seconds:
        translator.translate(sentences, beam_size, max_length, batch_size, sort_by_length=False)
        passes += 1
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    done = passes * len(sentences)
    return {"export": export.dir_name, "batch_size": batch_size, "threads": threads, "passes": passes,
            "sentences_per_s": round(done / wall, 3), "cpu_ms_per_sentence": round(1000 * cpu / done, 4)}


def measure_pytorch_teacher(
    checkpoint: Path, sentences: list[str], references: list[str], beam_size: int, threads: int = 0
) -> dict[str, Any]:
    """The teacher checkpoint decoded by ``distill.decode.translate`` on CPU, or a note saying why not.

    Its length limit is distill.decode's own (a function of the source length), not --max-length.
    """
    try:
        import torch

        from wdserve.distill.checkpoint import load_model
        from wdserve.distill.decode import translate
    except ImportError as err:
        note = f"PyTorch baseline skipped: {err} (install wdserve[train] to measure it)"
        log.warning(note)
        return {"skipped": note}
    if not Path(checkpoint).is_file():
        note = f"PyTorch baseline skipped: teacher checkpoint {checkpoint} not found"
        log.warning(note)
        return {"skipped": note}
    if threads > 0:
        torch.set_num_threads(threads)
    model, vocab, _ = load_model(checkpoint, "cpu")
    with torch.inference_mode():
        translate(model, vocab, sentences[:2], beam_size=beam_size)  # warm-up
        started = time.perf_counter()
        outputs = translate(model, vocab, sentences, beam_size=beam_size)
        seconds = time.perf_counter() - started
    tokens = word_count(outputs)
    return {
        "checkpoint": str(checkpoint),
        "sentences": len(sentences),
        "beam_size": beam_size,
        "torch_threads": torch.get_num_threads(),
        "seconds": round(seconds, 4),
        "sentences_per_s": round(len(sentences) / seconds, 3),
        "tokens_per_s": round(tokens / seconds, 3),
        "tokens": tokens,
        **quality(outputs, references),
    }
