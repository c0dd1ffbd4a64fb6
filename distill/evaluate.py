"""Corpus BLEU and chrF with sacreBLEU, for PyTorch checkpoints and CTranslate2 model directories.

Scores are computed on detokenized text (what ``Vocab.decode`` and the server
return) against raw references, and come with sacreBLEU's signatures so a reported
number says exactly how it was computed.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

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
    max_decoding_length: int = 256,
) -> dict:
    """Like ``evaluate_checkpoint``, for an exported directory (CTranslate2 files + sentencepiece.model).

    ``max_decoding_length`` is CTranslate2's own cap on output tokens (one for all sentences);
    it and the input length are lowered to the model's ``max_positions`` (from ``model.json``),
    past which CTranslate2 has no position encodings.
    """
    import ctranslate2
    import sentencepiece as spm

    model_dir = Path(model_dir)
    for required in ("model.bin", "sentencepiece.model"):
        if not (model_dir / required).is_file():
            raise FileNotFoundError(
                f"{model_dir} is not an exported wdserve model: {required} is missing "
                "(create one with `wdserve export`)"
            )
    max_positions = _exported_max_positions(model_dir)
    if max_positions is not None:
        max_decoding_length = min(max_decoding_length, max_positions)
    pairs = read_parallel(src_path, ref_path)
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "sentencepiece.model"))
    translator = ctranslate2.Translator(str(model_dir), device=device, compute_type=compute_type)
    started = time.perf_counter()
    results = translator.translate_batch(
        [sp.encode(source, out_type=str) for source, _ in pairs],
        beam_size=beam_size, max_batch_size=batch_size, max_decoding_length=max_decoding_length,
        max_input_length=max_positions or 1024,
    )
    hypotheses = [sp.decode(result.hypotheses[0]) for result in results]
    seconds = time.perf_counter() - started
    return _result(hypotheses, [r for _, r in pairs], beam_size, seconds)


def _exported_max_positions(model_dir: Path) -> int | None:
    metadata = model_dir / "model.json"
    if not metadata.is_file():
        return None
    try:
        return int(json.loads(metadata.read_text(encoding="utf-8"))["architecture"]["max_positions"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{metadata}: cannot read architecture.max_positions ({err})") from err


def _result(hypotheses: list[str], references: list[str], beam_size: int, seconds: float) -> dict:
    result = score(hypotheses, references)
    log.info("BLEU %.2f chrF %.2f on %d sentences (beam %d, %.1f s)", result["bleu"], result["chrf"],
             len(references), beam_size, seconds)
    return {**result, "hypotheses": hypotheses, "sentences": len(references), "beam_size": beam_size,
            "seconds": round(seconds, 3)}
