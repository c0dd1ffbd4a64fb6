"""Sequence-level knowledge distillation (Kim & Rush, 2016).

The teacher translates the whole training source side with beam search, and students train on
``(source, teacher translation)`` pairs, usually together with the original bitext (the weight
distillation paper trains on the union). Generation runs on the exported CTranslate2 teacher when one
is given (much faster) and on PyTorch beam search (``distill.decode.translate``) otherwise.

The distilled side is cached at ``out_path`` (one line per source) with ``out_path + ".json"`` beside
it recording the teacher checkpoint's sha256, the beam size, a hash of the sources and the line count.
A later call with the same teacher, beam and sources reuses the file; anything else regenerates it.
The text is written first and the json last, both atomically, so a cache is valid only once complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from wdserve.artifacts import DEFAULT_OUTPUT_LIMIT, ArtifactError, ExportDir
from wdserve.distill.checkpoint import atomic_save_text, file_sha256

log = logging.getLogger(__name__)

CHUNK = 2000  # sentences per progress line


def sources_sha256(sources: list[str]) -> str:
    return hashlib.sha256("\n".join(sources).encode("utf-8")).hexdigest()


def cache_info_path(out_path: Path) -> Path:
    return out_path.with_name(out_path.name + ".json")


def read_cache(out_path: Path, expected: dict) -> list[str] | None:
    """The cached translations if ``out_path`` and its json match ``expected``, else None."""
    info_path = cache_info_path(out_path)
    if not (out_path.is_file() and info_path.is_file()):
        return None
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    stale = [key for key, value in expected.items() if info.get(key) != value]
    if stale:
        log.info("sequence-level KD cache %s is stale (%s differ); regenerating", out_path, ", ".join(stale))
        return None
    lines = out_path.read_text(encoding="utf-8").split("\n")[:-1]  # the file ends with a newline
    if len(lines) != expected["lines"]:
        log.info("sequence-level KD cache %s has %d lines, expected %d; regenerating",
                 out_path, len(lines), expected["lines"])
        return None
    return lines


def generate_seqkd_targets(
    teacher_checkpoint: Path,
    sources: list[str],
    out_path: Path,
    beam_size: int = 4,
    ct2_model_dir: Path | None = None,
    device: str = "cpu",
    batch_size: int = 64,
) -> list[str]:
    """The teacher's beam-search translation of every source, cached at ``out_path`` (see module doc)."""
    out_path = Path(out_path)
    if beam_size < 1:
        raise ValueError(f"beam_size must be at least 1, got {beam_size}")
    teacher_sha = file_sha256(teacher_checkpoint)
    expected = {
        "teacher_sha256": teacher_sha,
        "beam_size": beam_size,
        "sources_sha256": sources_sha256(sources),
        "lines": len(sources),
    }
    cached = read_cache(out_path, expected)
    if cached is not None:
        log.info("reusing %d distilled targets from %s", len(cached), out_path)
        return cached

    if ct2_model_dir is not None and not _ct2_matches(Path(ct2_model_dir), teacher_sha):
        ct2_model_dir = None
    started = time.perf_counter()
    if ct2_model_dir is not None:
        log.info("translating %d sources with CTranslate2 teacher %s (beam %d)",
                 len(sources), ct2_model_dir, beam_size)
        translations = _translate_ct2(Path(ct2_model_dir), sources, beam_size, device, batch_size, started)
        generator = "ctranslate2"
    else:
        log.info("translating %d sources with PyTorch teacher %s (beam %d)",
                 len(sources), teacher_checkpoint, beam_size)
        translations = _translate_torch(Path(teacher_checkpoint), sources, beam_size, device, batch_size,
                                        started)
        generator = "pytorch"
    # A translation never spans lines, but guard the one-line-per-source contract anyway.
    translations = [" ".join(t.split("\n")) for t in translations]
    atomic_save_text("".join(t + "\n" for t in translations), out_path)
    info = {**expected, "generator": generator, "teacher_checkpoint": str(teacher_checkpoint),
            "seconds": round(time.perf_counter() - started, 2)}
    atomic_save_text(json.dumps(info, indent=2) + "\n", cache_info_path(out_path))
    log.info("wrote %d distilled targets to %s in %.1fs", len(translations), out_path, info["seconds"])
    return translations


def _ct2_matches(model_dir: Path, teacher_sha: str) -> bool:
    """True when ``model_dir`` is a CTranslate2 export of this very teacher checkpoint."""
    try:
        exported = ExportDir.read(model_dir).info.checkpoint_sha256
    except ArtifactError as err:
        log.warning("%s; using PyTorch beam search", err)
        return False
    if exported != teacher_sha:
        log.warning("%s was exported from another checkpoint (sha256 %s); using PyTorch beam search",
                    model_dir, str(exported)[:12])
        return False
    return True


def _progress(done: int, total: int, started: float) -> None:
    elapsed = time.perf_counter() - started
    log.info("seqkd: %d/%d sentences (%.1f sentences/s)", done, total, done / max(elapsed, 1e-9))


def _translate_ct2(
    model_dir: Path, sources: list[str], beam_size: int, device: str, batch_size: int, started: float
) -> list[str]:
    import ctranslate2

    from wdserve.pieces import Tokenizer

    export = ExportDir.read(model_dir)
    max_positions = export.max_positions or 512
    tokenizer = Tokenizer.for_export(export)
    translator = ctranslate2.Translator(
        str(model_dir), device="cuda" if str(device).startswith("cuda") else "cpu"
    )
    # add_source_eos is set in the exported model: pass pieces only, cut to leave room for </s>.
    pieces = [tokenizer.source_pieces(s)[: max_positions - 1] for s in sources]
    # One call per source length, so each sentence gets exactly its own output limit
    # (CTranslate2's max_decoding_length applies to a whole call).
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(pieces):
        by_length.setdefault(len(p), []).append(i)
    results: list[str] = [""] * len(pieces)
    done = logged = 0
    for length in sorted(by_length):
        indices = by_length[length]
        limit = DEFAULT_OUTPUT_LIMIT.tokens(length, max_positions)
        for start in range(0, len(indices), CHUNK):
            chunk = indices[start : start + CHUNK]
            outputs = translator.translate_batch([pieces[i] for i in chunk], beam_size=beam_size,
                                                 max_batch_size=batch_size, max_decoding_length=limit)
            for i, output in zip(chunk, outputs, strict=True):
                results[i] = tokenizer.decode(output.hypotheses[0])
            done += len(chunk)
            if done - logged >= CHUNK or done == len(pieces):
                _progress(done, len(pieces), started)
                logged = done
    return results


def _translate_torch(
    checkpoint: Path, sources: list[str], beam_size: int, device: str, batch_size: int, started: float
) -> list[str]:
    from wdserve.distill.checkpoint import load_model
    from wdserve.distill.decode import translate

    model, vocab, _ = load_model(checkpoint, device)
    results: list[str] = []
    for start in range(0, len(sources), CHUNK):
        chunk = sources[start : start + CHUNK]
        results += translate(model, vocab, chunk, beam_size=beam_size, batch_size=batch_size, device=device)
        _progress(start + len(chunk), len(sources), started)
    return results
