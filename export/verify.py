"""Side-by-side check of exported CTranslate2 models against their PyTorch checkpoint.

For every variant (one exported directory per quantization) CTranslate2 translates
the sentences greedily; then

- PyTorch, teacher-forced on exactly those tokens, must pick each of them as its
  argmax (and ``</s>`` where CTranslate2 stopped): that is the statement "greedy
  decoding gives identical tokens", checked step by step up to the shared length
  cap, without depending on two decoders agreeing about when to stop. A token
  PyTorch scores within ``FLOAT32_LOGPROB_TOLERANCE`` of its argmax counts as its
  pick (a tie, which float rounding breaks either way; counted in ``ties``): an
  undertrained model's near-uniform output has them, and they say nothing about
  the conversion;
- CTranslate2's per-token log-probabilities (``Translator.score_batch``) are
  compared with PyTorch's log-softmax at the same positions;
- each variant's detokenized output is scored with sacreBLEU against the float32
  variant's output, the cost of quantization in translation terms.

float32 must match within ``FLOAT32_LOGPROB_TOLERANCE``; quantized variants are
reported, not judged. Variants whose compute type the device lacks (float16 and
int8_float16 on a CPU) are reported as ``"skipped: needs CUDA"``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import sacrebleu
import torch

from wdserve.artifacts import ExportDir
from wdserve.distill.batching import pad_ids
from wdserve.distill.checkpoint import file_sha256
from wdserve.distill.model import BOS_ID, EOS_ID, Transformer
from wdserve.distill.vocab import Vocab
from wdserve.export.convert import ExportError, load_exportable

log = logging.getLogger(__name__)

FLOAT32_LOGPROB_TOLERANCE = 1e-4
SKIPPED_NEEDS_CUDA = "skipped: needs CUDA"


def verify_export(
    checkpoint: Path,
    model_dirs: dict[str, Path],
    sentences: list[str],
    device: str = "cpu",
    max_decoding_length: int = 256,
    batch_size: int = 32,
) -> dict:
    """Compares each CTranslate2 directory in ``model_dirs`` (label -> dir) with ``checkpoint``.

    Returns a JSON-serializable report: per variant its status, greedy token identity
    (``greedy_identical``, ``identical_sentences``), largest and mean absolute per-token
    log-probability difference, and BLEU against the float32 variant's output; plus
    ``float32_parity`` (None when no float32 variant ran).
    """
    import ctranslate2

    if not sentences:
        raise ExportError("verification needs at least one sentence")
    checkpoint = Path(checkpoint)
    model, vocab, _ = load_exportable(checkpoint)
    model.to(device)
    sha = file_sha256(checkpoint)
    max_positions = model.config.max_positions
    # The source gets </s> appended, and scoring feeds <s> + hypothesis: both must fit the position table.
    sources = [vocab.encode_source_pieces(text)[: max_positions - 1] for text in sentences]
    max_length = max(1, min(max_decoding_length, max_positions - 1))
    try:
        supported = set(ctranslate2.get_supported_compute_types(device))
    except (RuntimeError, ValueError):
        supported = set()

    variants: dict[str, dict] = {}
    outputs: dict[str, list[str]] = {}
    for label, model_dir in model_dirs.items():
        model_dir = Path(model_dir)
        info = ExportDir.read(model_dir).info
        quantization = info.quantization
        entry: dict = {"model_dir": str(model_dir), "quantization": quantization}
        variants[label] = entry
        if quantization not in supported:
            entry["status"] = SKIPPED_NEEDS_CUDA if device == "cpu" else f"skipped: not supported on {device}"
            continue
        if info.checkpoint_sha256 != sha:
            log.warning("%s was exported from another checkpoint than %s", model_dir, checkpoint)
        entry["same_checkpoint"] = info.checkpoint_sha256 == sha
        translator = ctranslate2.Translator(str(model_dir), device=device, compute_type=quantization)
        started = time.perf_counter()
        results = translator.translate_batch(
            sources, beam_size=1, max_decoding_length=max_length, min_decoding_length=0,
            max_batch_size=batch_size,
        )
        entry["translate_seconds"] = round(time.perf_counter() - started, 4)
        hypotheses = [result.hypotheses[0] for result in results]
        scores = translator.score_batch(sources, hypotheses, max_batch_size=batch_size)
        del translator
        entry.update(_compare_with_pytorch(model, vocab, sources, hypotheses, scores, max_length, device,
                                           batch_size))
        entry["status"] = "ok"
        outputs[label] = [vocab.decode(_ids(vocab, tokens)) for tokens in hypotheses]

    reference = next((label for label, entry in variants.items()
                      if entry["quantization"] == "float32" and label in outputs), None)
    for label, entry in variants.items():
        if label in outputs and reference is not None:
            entry["bleu_vs_float32"] = round(
                sacrebleu.corpus_bleu(outputs[label], [outputs[reference]]).score, 2
            )
    parity = None
    if reference is not None:
        ref = variants[reference]
        parity = bool(ref["greedy_identical"] and ref["max_logprob_diff"] < FLOAT32_LOGPROB_TOLERANCE)
        if not parity:
            log.warning("float32 export %s does not match %s: %s", ref["model_dir"], checkpoint,
                        {k: ref[k] for k in ("identical_sentences", "max_logprob_diff")})
    return {
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": sha,
        "device": device,
        "sentences": len(sentences),
        "max_decoding_length": max_length,
        "float32_tolerance": FLOAT32_LOGPROB_TOLERANCE,
        "float32_parity": parity,
        "variants": variants,
    }


def _ids(vocab: Vocab, pieces: list[str]) -> list[int]:
    return [vocab.piece_to_id(piece) for piece in pieces]


@torch.no_grad()
def _compare_with_pytorch(
    model: Transformer,
    vocab: Vocab,
    sources: list[list[str]],
    hypotheses: list[list[str]],
    scores: list,
    max_length: int,
    device: str,
    batch_size: int,
) -> dict:
    """Teacher-forces PyTorch on CTranslate2's greedy tokens; see the module docstring."""
    identical = ties = 0
    first_mismatch = None
    diffs: list[np.ndarray] = []
    for start in range(0, len(sources), batch_size):
        chunk = range(start, min(start + batch_size, len(sources)))
        src = pad_ids([_ids(vocab, sources[i]) + [EOS_ID] for i in chunk], device)  # (B, S)
        targets = [_ids(vocab, hypotheses[i]) + [EOS_ID] for i in chunk]
        tgt_in = pad_ids([[BOS_ID] + t[:-1] for t in targets], device)  # (B, T)
        log_probs = torch.log_softmax(model(src, tgt_in).float(), dim=-1).cpu()  # (B, T, V)
        for row, i in enumerate(chunk):
            target = torch.tensor(targets[row])
            n = len(target)
            ours = log_probs[row, :n].gather(1, target[:, None])[:, 0].numpy()
            theirs = np.asarray(scores[i].log_probs, dtype=np.float32)
            if theirs.shape != ours.shape:
                raise ExportError(f"CTranslate2 scored {len(theirs)} tokens for sentence {i}, expected {n}")
            diffs.append(np.abs(theirs - ours))
            # Without the cap, CTranslate2 stopped because </s> was its argmax: check that step too.
            checked = n if n - 1 < max_length else n - 1
            mismatches, sentence_ties = greedy_mismatches(log_probs[row, :checked], target[:checked])
            ties += sentence_ties
            if not mismatches:
                identical += 1
            elif first_mismatch is None:
                step = mismatches[0]
                first_mismatch = {"sentence": i, "step": step, "ctranslate2": int(target[step]),
                                  "pytorch": int(log_probs[row, step].argmax())}
    all_diffs = np.concatenate(diffs)
    return {
        "greedy_identical": identical == len(sources),
        "identical_sentences": identical,
        "first_mismatch": first_mismatch,
        "ties": ties,
        "max_logprob_diff": float(all_diffs.max()),
        "mean_logprob_diff": float(all_diffs.mean()),
        "mean_output_tokens": float(np.mean([len(h) for h in hypotheses])),
    }


def greedy_mismatches(log_probs: torch.Tensor, tokens: torch.Tensor) -> tuple[list[int], int]:
    """The steps where ``tokens`` (T,) is not the argmax of ``log_probs`` (T, V), and how many steps
    took a token that ties with the argmax within ``FLOAT32_LOGPROB_TOLERANCE`` (not mismatches)."""
    best = log_probs.max(dim=-1).values
    chosen = log_probs.gather(1, tokens[:, None])[:, 0]
    not_argmax = log_probs.argmax(dim=-1) != tokens
    tied = not_argmax & (best - chosen < FLOAT32_LOGPROB_TOLERANCE)
    return (not_argmax & ~tied).nonzero()[:, 0].tolist(), int(tied.sum())
