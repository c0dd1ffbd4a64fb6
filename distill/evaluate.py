"""Corpus BLEU and chrF with sacreBLEU, for PyTorch checkpoints and CTranslate2 model directories.

Scores are computed on detokenized text (what ``Vocab.decode`` and the server
return) against raw references, and come with sacreBLEU's signatures so a reported
number says exactly how it was computed.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from wdserve.artifacts import (
    DEFAULT_MAX_LENGTH,
    DEFAULT_OUTPUT_LIMIT,
    ExportDir,
    OutputLimit,
    translate_corpus,
)
from wdserve.distill.data import read_parallel

log = logging.getLogger(__name__)


def score(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus BLEU and chrF of ``hypotheses`` against one reference each.

    Returns ``{"bleu", "chrf", "bleu_signature", "chrf_signature"}``.
    """
    from sacrebleu.metrics import BLEU, CHRF

    if len(hypotheses) != len(references):
        raise ValueError(
            f"{len(hypotheses)} hypotheses but {len(references)} references: they must pair up line by line"
        )
    if not references:
        raise ValueError("nothing to score: no references")
    bleu, chrf = BLEU(), CHRF()
    return {
        "bleu": round(bleu.corpus_score(hypotheses, [references]).score, 2),
        "chrf": round(chrf.corpus_score(hypotheses, [references]).score, 2),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }


def evaluate_checkpoint(
    checkpoint: Path,
    src_path: Path,
    ref_path: Path,
    beam_size: int = 4,
    device: str = "cpu",
    batch_size: int = 64,
) -> dict:
    """Translates ``src_path`` with a PyTorch checkpoint and scores it against ``ref_path``.

    Returns ``score()``'s keys plus ``hypotheses``, ``sentences``, ``beam_size``, ``seconds`` and
    ``parameters`` (the model's).
    """
    from wdserve.distill.checkpoint import load_model
    from wdserve.distill.decode import translate
    from wdserve.distill.model import count_parameters

    pairs = read_parallel(src_path, ref_path)
    model, vocab, _ = load_model(checkpoint, device)
    started = time.perf_counter()
    hypotheses = translate(model, vocab, [s for s, _ in pairs], beam_size=beam_size,
                           batch_size=batch_size, device=device)
    seconds = time.perf_counter() - started
    return {**_result(hypotheses, [r for _, r in pairs], beam_size, seconds),
            "parameters": count_parameters(model)}


def evaluate_ctranslate2(
    model_dir: Path,
    src_path: Path,
    ref_path: Path,
    beam_size: int = 4,
    device: str = "cpu",
    compute_type: str = "default",
    batch_size: int = 32,
    max_length: int = DEFAULT_MAX_LENGTH,
    output_limit: OutputLimit = DEFAULT_OUTPUT_LIMIT,
) -> dict:
    """Like ``evaluate_checkpoint``, for an exported directory, decoded as ``wdserve serve`` decodes it.

    Every sentence is held to ``output_limit`` and ``max_length`` (the server's defaults) and the
    model's ``max_positions``, through the same bounded call the server makes, so the score is the
    one the service delivers.
    """
    import ctranslate2

    from wdserve.pieces import Tokenizer

    export = ExportDir.read(model_dir, require_info=False)
    pairs = read_parallel(src_path, ref_path)
    tokenizer = Tokenizer.for_export(export)
    translator = ctranslate2.Translator(str(export.path), device=device, compute_type=compute_type)
    started = time.perf_counter()
    sources = [tokenizer.source_pieces(source) for source, _ in pairs]
    hypotheses = [""] * len(sources)
    for indices, outputs in translate_corpus(translator, sources, beam_size, batch_size, max_length,
                                             output_limit, export.max_positions,
                                             source_end=tokenizer.source_end):
        for i, pieces in zip(indices, outputs, strict=True):
            hypotheses[i] = tokenizer.decode(pieces)
    seconds = time.perf_counter() - started
    return _result(hypotheses, [r for _, r in pairs], beam_size, seconds)


def _result(hypotheses: list[str], references: list[str], beam_size: int, seconds: float) -> dict:
    result = score(hypotheses, references)
    log.info("BLEU %.2f chrF %.2f on %d sentences (beam %d, %.1f s)", result["bleu"], result["chrf"],
             len(references), beam_size, seconds)
    return {**result, "hypotheses": hypotheses, "sentences": len(references), "beam_size": beam_size,
            "seconds": round(seconds, 3)}
