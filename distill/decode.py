"""Greedy and beam search with the decoder's key/value cache, and batched translation of text.

Both searches return token ids without ``<s>`` and ``</s>``. Sentence ``i`` may
generate at most ``int(max_len_a * source_length_i + max_len_b)`` tokens (its
``</s>`` included, source length counted without padding, capped by the model's
``max_positions``); a hypothesis that reaches the limit is returned as it stands.
Nothing is masked out of the output distribution, as in CTranslate2, so the two
agree even on an untrained model.

Beam search follows fairseq: each step ranks the best ``2 * beam`` extensions of
a sentence's live hypotheses; an extension ending in ``</s>`` among the first
``beam`` of them is finished, and the best ``beam`` others stay live. A sentence
stops when it has ``beam`` finished hypotheses (or reaches its length limit, where
its live ones are finished as they are). The winner has the best normalized score
``sum(log p) / length ** length_penalty``, where length counts the generated tokens
with ``</s>`` (fairseq's and CTranslate2's simple normalization; 0 disables it).
With ``beam_size=1`` this is exactly greedy search.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from wdserve.artifacts import OutputLimit
from wdserve.distill.batching import pad_ids
from wdserve.distill.model import BOS_ID, EOS_ID, PAD_ID, Transformer
from wdserve.distill.vocab import Vocab

log = logging.getLogger(__name__)

DEFAULT_MAX_LEN_A, DEFAULT_MAX_LEN_B = OutputLimit.ratio, OutputLimit.margin  # as served


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Decoding needs dropout off; a model handed over mid-training goes back to training mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _length_limits(model: Transformer, src: torch.Tensor, max_len_a: float, max_len_b: int) -> torch.Tensor:
    lengths = (src != PAD_ID).sum(dim=1).float()  # (B,)
    limits = (max_len_a * lengths + max_len_b).long()
    return limits.clamp(min=1, max=model.config.max_positions)


@torch.inference_mode()
def greedy_search(
    model: Transformer,
    src: torch.Tensor,
    *,
    max_len_a: float = DEFAULT_MAX_LEN_A,
    max_len_b: int = DEFAULT_MAX_LEN_B,
) -> list[list[int]]:
    """The most likely next token at every step, for a batch of source ids (B, S)."""
    with _eval_mode(model):
        limits = _length_limits(model, src, max_len_a, max_len_b)
        memory, mask, _ = model.encoder(src)
        state = model.start_state()
        outputs: list[list[int]] = [[] for _ in range(src.size(0))]
        rows = torch.arange(src.size(0), device=src.device)  # original sentence of each live row
        last = torch.full((src.size(0), 1), BOS_ID, dtype=torch.long, device=src.device)
        for step in range(int(limits.max())):
            logits = model.decoder(last, memory, mask, state)[:, -1]  # (n, V)
            tokens = logits.argmax(dim=-1)  # (n,)
            for row, token in zip(rows.tolist(), tokens.tolist(), strict=True):
                outputs[row].append(token)
            live = (tokens != EOS_ID) & (limits[rows] > step + 1)
            if not live.any():
                break
            if not live.all():  # drop finished sentences from the batch and the cache
                keep = live.nonzero().squeeze(1)
                rows, tokens = rows[keep], tokens[keep]
                memory, mask = memory.index_select(0, keep), mask.index_select(0, keep)
                state.reorder(keep)
            last = tokens[:, None]
        return [ids[:-1] if ids and ids[-1] == EOS_ID else ids for ids in outputs]


@torch.inference_mode()
def beam_search(
    model: Transformer,
    src: torch.Tensor,
    beam_size: int,
    length_penalty: float = 1.0,
    *,
    max_len_a: float = DEFAULT_MAX_LEN_A,
    max_len_b: int = DEFAULT_MAX_LEN_B,
) -> list[list[int]]:
    """The best hypothesis of a ``beam_size`` beam search for each sentence of ``src`` (B, S)."""
    if beam_size < 1:
        raise ValueError(f"beam_size must be at least 1, got {beam_size}")
    with _eval_mode(model):
        return _beam_search(model, src, beam_size, length_penalty, max_len_a, max_len_b)


def _beam_search(
    model: Transformer, src: torch.Tensor, k: int, length_penalty: float, max_len_a: float, max_len_b: int
) -> list[list[int]]:
    device = src.device
    limits = _length_limits(model, src, max_len_a, max_len_b)
    memory, mask, _ = model.encoder(src)
    expand = torch.arange(src.size(0), device=device).repeat_interleave(k)
    memory, mask = memory.index_select(0, expand), mask.index_select(0, expand)  # (n*k, ...)
    state = model.start_state()

    n = src.size(0)
    sentences = list(range(n))  # original index of each live sentence
    scores = torch.full((n, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start as the same empty hypothesis: keep one
    history = torch.empty((n * k, 0), dtype=torch.long, device=device)  # tokens of each live hypothesis
    last = torch.full((n * k, 1), BOS_ID, dtype=torch.long, device=device)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(n)]

    def finish(sentence: int, tokens: list[int], score: float) -> None:
        finished[sentence].append((score / len(tokens) ** length_penalty, tokens))

    for step in range(int(limits.max())):
        logits = model.decoder(last, memory, mask, state)[:, -1]  # (n*k, V)
        vocab_size = logits.size(-1)
        log_probs = F.log_softmax(logits.float(), dim=-1).view(n, k, vocab_size)
        candidates = (scores[:, :, None] + log_probs).view(n, k * vocab_size)
        top_scores, top_index = candidates.topk(min(2 * k, k * vocab_size), dim=1)  # (n, 2k), best first
        origin, token = top_index // vocab_size, top_index % vocab_size  # beam and token of each candidate

        # Extensions ending in </s> among the first k candidates are finished hypotheses.
        ends = token == EOS_ID
        rank = torch.arange(top_index.size(1), device=device)
        done_now = ends & (rank < k) & torch.isfinite(top_scores)
        for i, j in done_now.nonzero().tolist():
            tokens = history[i * k + origin[i, j]].tolist() + [EOS_ID]
            finish(sentences[i], tokens, top_scores[i, j].item())

        # The first k candidates not ending in </s> stay live (there are at least k of 2k).
        keep = (rank + ends * top_index.size(1)).topk(k, dim=1, largest=False).indices.sort(dim=1).values
        scores = top_scores.gather(1, keep)  # (n, k)
        beams = (origin.gather(1, keep) + torch.arange(n, device=device)[:, None] * k).view(-1)  # (n*k,)
        new_tokens = token.gather(1, keep).view(-1, 1)
        history = torch.cat([history.index_select(0, beams), new_tokens], dim=1)
        state.reorder(beams)

        at_limit = (limits[sentences] <= step + 1).tolist()
        still_live = []
        for i, sentence in enumerate(sentences):
            if at_limit[i]:  # out of length: live hypotheses finish as they are
                for b in range(k):
                    if torch.isfinite(scores[i, b]):
                        finish(sentence, history[i * k + b].tolist(), scores[i, b].item())
            elif len(finished[sentence]) < k:
                still_live.append(i)
        if not still_live:
            break
        if len(still_live) < n:  # drop finished sentences from the batch and the cache
            keep_sentences = torch.tensor(still_live, device=device)
            rows = (keep_sentences[:, None] * k + torch.arange(k, device=device)).view(-1)
            sentences = [sentences[i] for i in still_live]
            scores, history = scores[keep_sentences], history.index_select(0, rows)
            new_tokens = new_tokens.index_select(0, rows)
            memory, mask = memory.index_select(0, rows), mask.index_select(0, rows)
            state.reorder(rows)
            n = len(still_live)
        last = new_tokens

    best = []
    for hypotheses in finished:
        _, tokens = max(hypotheses, key=lambda hypothesis: hypothesis[0])
        best.append(tokens[:-1] if tokens and tokens[-1] == EOS_ID else tokens)
    return best


@torch.inference_mode()
def sequence_log_probs(model: Transformer, src: torch.Tensor, hypotheses: list[list[int]]) -> torch.Tensor:
    """Teacher-forced ``sum(log p)`` of each hypothesis (ids without specials) followed by ``</s>``: (B,)."""
    with _eval_mode(model):
        tgt_in = pad_ids([[BOS_ID, *ids] for ids in hypotheses], src.device)  # (B, T)
        tgt_out = pad_ids([[*ids, EOS_ID] for ids in hypotheses], src.device)  # (B, T)
        log_probs = F.log_softmax(model(src, tgt_in).float(), dim=-1)  # (B, T, V)
        picked = log_probs.gather(2, tgt_out[:, :, None]).squeeze(2)  # (B, T)
        return (picked * (tgt_out != PAD_ID)).sum(dim=1)


def encode_sources(vocab: Vocab, sentences: list[str], max_positions: int) -> list[list[int]]:
    """Source ids ``pieces + [</s>]``, cut to the model's ``max_positions`` (with a warning)."""
    encoded = []
    for sentence in sentences:
        ids = vocab.encode_source(sentence) + [EOS_ID]
        if len(ids) > max_positions:
            log.warning("source of %d tokens cut to max_positions=%d: %.60s...", len(ids), max_positions,
                        sentence)
            ids = ids[: max_positions - 1] + [EOS_ID]
        encoded.append(ids)
    return encoded


@torch.inference_mode()
def translate(
    model: Transformer,
    vocab: Vocab,
    sentences: list[str],
    beam_size: int = 1,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    *,
    length_penalty: float = 1.0,
    max_len_a: float = DEFAULT_MAX_LEN_A,
    max_len_b: int = DEFAULT_MAX_LEN_B,
) -> list[str]:
    """Translations of ``sentences`` in their order; batches hold sentences of similar length.

    ``model`` must already be on ``device``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    encoded = encode_sources(vocab, sentences, model.config.max_positions)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    results: list[str] = [""] * len(encoded)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        src = pad_ids([encoded[i] for i in chunk], device)
        if beam_size == 1:
            outputs = greedy_search(model, src, max_len_a=max_len_a, max_len_b=max_len_b)
        else:
            outputs = beam_search(model, src, beam_size, length_penalty, max_len_a=max_len_a,
                                  max_len_b=max_len_b)
        for i, ids in zip(chunk, outputs, strict=True):
            results[i] = vocab.decode(ids)
    return results
