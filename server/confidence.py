"""Confidence: how sure the model itself was of its translation, on a 0-1 scale.

A sentence's confidence is the geometric mean of the probabilities the model gave the tokens it
wrote, ``</s>`` included::

    confidence = exp(mean log p(y_t | y_<t, x))      over t = 1 .. len(y) + 1

which is ``exp`` of CTranslate2's score (``return_scores`` with its default length penalty of 1:
the summed log-probability over the output's length). 1 means every token had probability 1; 0.5
means the model gave its own tokens probability 0.5 on average (geometrically).

A text of several sentences (the server splits texts into sentences) has the geometric mean over
all of its tokens: the sentences' mean log-probabilities weighted by their token counts (output
tokens + ``</s>``), so a long uncertain sentence weighs more than a short sure one.

It is the model's own belief, not a quality guarantee: a model can be confidently wrong (a
fluent hallucination scores high), and scores are comparable only between outputs of one model
(a larger model is usually sharper, hence more confident, at equal quality).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # service imports this module
    from wdserve.server.service import Sentence, Translation

DIGITS = 4  # confidences are rounded to this many decimals in responses


def confidence(log_prob: float) -> float:
    """A mean token log-probability -> 0..1."""
    return min(1.0, math.exp(log_prob))


def text_confidence(sentences: list[Sentence]) -> float | None:
    """The token-weighted geometric mean over a text's sentences (None when one has no score)."""
    if any(sentence.log_prob is None for sentence in sentences):
        return None
    weights = [sentence.tokens + 1 for sentence in sentences]  # + </s>, which the score counts
    total = sum(weights)
    return confidence(sum(w * s.log_prob for w, s in zip(weights, sentences, strict=True)) / total)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, DIGITS)


def sentence_details(sentence: Sentence) -> dict[str, Any]:
    details: dict[str, Any] = {"translatedText": sentence.text, "model": sentence.model}
    if sentence.log_prob is not None:
        details["confidence"] = _rounded(confidence(sentence.log_prob))
    return details


def response_fields(result: Translation, single: bool, with_confidence: bool,
                    with_sentences: bool) -> dict[str, Any]:
    """The response's ``confidence`` (per text) and ``sentences`` (per sentence: text, model, confidence),
    each shaped like ``translatedText``: a value for a string ``q``, a list for a list."""
    fields: dict[str, Any] = {}
    if not (with_confidence or with_sentences):
        return fields
    by_text = result.by_text()
    if with_confidence:
        per_text = [_rounded(text_confidence(sentences)) for sentences in by_text]
        fields["confidence"] = per_text[0] if single else per_text
    if with_sentences:
        per_text = [[sentence_details(s) for s in sentences] for sentences in by_text]
        fields["sentences"] = per_text[0] if single else per_text
    return fields
