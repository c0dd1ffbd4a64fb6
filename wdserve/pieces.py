"""Text to SentencePiece pieces and back: the one rule that training, evaluation and serving share.

A model's vocabulary comes with one joint SentencePiece model (wdserve's own) or one model per language
(an imported Marian teacher's ``source.spm`` and ``target.spm``, and its students'). Either way a
model reads and writes *pieces*; ``Tokenizer`` cuts text into them and joins them back the same way in
``distill.vocab.Vocab`` (training, PyTorch search) and in every reader of an export (the server,
``wdserve evaluate``, sequence-level KD, the bench's direct baseline), so a model is never trained on
one cut and served with another. It needs SentencePiece only, not PyTorch: the server imports it.

With two models the rules are ``MarianTokenizer``'s:

- a text that starts with a language code such as ``>>fr<<`` keeps the code as one piece (a
  multilingual model's target-language token) and the rest is cut by the SentencePiece model;
- output pieces are joined by the target model, and a piece that model lacks (the vocabulary is
  shared by both languages) comes out verbatim, with its ``\u2581`` read as a space;
- a source ends in ``</s>``. wdserve's exports have CTranslate2 append it (``add_source_eos``), as
  for every wdserve model; CTranslate2's own conversion of a Hugging Face Marian model
  (``ct2-transformers-converter``) leaves it to the caller, so for such a directory
  ``Tokenizer.for_export`` sets ``source_end``, which the callers of CTranslate2 put after the
  pieces (``wdserve.artifacts.translate_bounded``).

A joint model cuts and joins exactly as SentencePiece does, with no language-code rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

from wdserve.artifacts import ExportDir

WORD_BOUNDARY = "\u2581"  # SentencePiece's "▁", the space it keeps at the start of a word piece


def split_language_code(text: str) -> tuple[list[str], str]:
    """``([">>fr<<"], rest)`` for a text that starts with a language code, ``([], text)`` otherwise."""
    if text.startswith(">>") and (end := text.find("<<")) != -1:
        return [text[: end + 2]], text[end + 2 :]
    return [], text


class Tokenizer:
    """Source text -> pieces and target pieces -> text.

    ``Tokenizer(model)`` is a joint tokenizer; ``Tokenizer(source_model, target_model)`` a split one.
    A model is the serialized SentencePiece model (bytes) or a path to it. ``source_end``: tokens a
    caller appends to every source for the model (module docstring).
    """

    def __init__(self, source_model: bytes | Path, target_model: bytes | Path | None = None,
                 source_end: Sequence[str] = ()) -> None:
        self.source_sp = _load(source_model)
        self.target_sp = self.source_sp if target_model is None else _load(target_model)
        self.is_joint = target_model is None
        self.source_end = tuple(source_end)

    @classmethod
    def for_export(cls, export: ExportDir) -> Tokenizer:
        """The tokenizer of an export directory: one file named twice is a joint model (an export's
        ``sentencepiece.model``), two are Marian's, with ``source_end`` ``</s>`` unless CTranslate2
        appends it itself."""
        if export.source_vocab == export.target_vocab:
            return cls(export.source_vocab)
        config = export.ct2_config
        source_end = () if config.get("add_source_eos") else (config.get("eos_token") or "</s>",)
        return cls(export.source_vocab, export.target_vocab, source_end)

    def source_pieces(self, text: str) -> list[str]:
        """Pieces of a source sentence, without special tokens (a model appends ``</s>`` itself)."""
        return self._pieces(self.source_sp, text)

    def target_pieces(self, text: str) -> list[str]:
        """Pieces of a target sentence, without special tokens."""
        return self._pieces(self.target_sp, text)

    def _pieces(self, sp: spm.SentencePieceProcessor, text: str) -> list[str]:
        if self.is_joint:
            return sp.encode(text, out_type=str)
        code, text = split_language_code(text)
        return code + sp.encode(text, out_type=str)

    def decode(self, pieces: list[str]) -> str:
        """The target text of output pieces (no special tokens among them)."""
        text = self.target_sp.decode_pieces(pieces)
        if self.is_joint:
            return text
        return text.replace(WORD_BOUNDARY, " ").strip()


def _load(model: bytes | Path) -> spm.SentencePieceProcessor:
    if isinstance(model, bytes):
        return spm.SentencePieceProcessor(model_proto=model)
    return spm.SentencePieceProcessor(model_file=str(model))
