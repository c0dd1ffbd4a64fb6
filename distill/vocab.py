"""Vocabularies whose special tokens match CTranslate2's defaults.

Ids 0-3 are ``<pad> <unk> <s> </s>`` (see ``distill.model``), so the token list
written into a CTranslate2 model and the ids the PyTorch model was trained on
agree by construction. wdserve trains one joint SentencePiece model
(``train_sentencepiece``); an imported teacher brings a token list and a
SentencePiece model per language (``Vocab.split``, ``distill.marian``).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from wdserve.distill.model import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, UNK_ID
from wdserve.pieces import Tokenizer

log = logging.getLogger(__name__)


def train_sentencepiece(
    sentences: Iterable[str],
    model_path: Path,
    vocab_size: int,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    seed_sentences: int = 1_000_000,
) -> Path:
    """Trains a joint model on ``sentences`` (source and target together) and writes ``model_path``.

    ``vocab_size`` is lowered to what the corpus can support (SentencePiece refuses
    a size larger than the pieces it finds), with a log line saying so.
    """
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    lines = [s for s in sentences if s.strip()]
    if not lines:
        raise ValueError("cannot train a vocabulary on an empty corpus")
    size = vocab_size
    while True:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines),
                model_writer=buffer,
                vocab_size=size,
                model_type=model_type,
                character_coverage=character_coverage,
                input_sentence_size=seed_sentences,
                shuffle_input_sentence=True,
                pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
                pad_piece=SPECIAL_TOKENS[PAD_ID], unk_piece=SPECIAL_TOKENS[UNK_ID],
                bos_piece=SPECIAL_TOKENS[BOS_ID], eos_piece=SPECIAL_TOKENS[EOS_ID],
                hard_vocab_limit=True,
                minloglevel=2,
                num_threads=2,
            )
            break
        except RuntimeError as err:
            message = str(err)
            if "Vocabulary size is too high" not in message and "vocab_size" not in message:
                raise
            # SentencePiece reports the largest size it can build, e.g. "... <= 187".
            largest = int(message.rsplit("<=", 1)[-1].strip().rstrip(".")) if "<=" in message else size // 2
            if largest >= size or largest < len(SPECIAL_TOKENS) + 1:
                raise
            log.warning("corpus supports at most %d pieces; lowering vocab_size from %d", largest, size)
            size = largest
            buffer = io.BytesIO()
    model_path.write_bytes(buffer.getvalue())
    return model_path


class Vocab:
    """The model's tokens, and the SentencePiece model(s) that turn text into their ids and back.

    Two kinds, one interface (``encode_source``, ``encode_target``, ``decode``, ``tokens``):

    - joint, ``Vocab(model)``: wdserve's own vocabulary, one SentencePiece model (a file or its
      bytes) for both languages whose ids are the model's ids;
    - split, ``Vocab.split(tokens, source_model, target_model)``: an imported teacher's (Marian's
      ``vocab.json`` with ``source.spm`` and ``target.spm``), a token list in the model's id order
      plus one SentencePiece model per language. Each model only cuts text into pieces; a piece's id
      is its position in ``tokens``, and a piece the list lacks is ``<unk>``.

    Either way ids 0-3 are ``<pad> <unk> <s> </s>``, and text is cut into pieces and pieces joined
    into text by ``wdserve.pieces.Tokenizer`` (``tokenizer``), the rule the readers of an export
    (server, evaluation, seq-KD) apply too: with two models a leading language code such as
    ``>>fr<<`` stays one piece, as ``MarianTokenizer`` keeps it. A checkpoint stores ``to_state()``
    (the joint model's bytes, as it always has, or a dict for a split vocabulary) and ``Vocab(state)``
    rebuilds it.
    """

    def __init__(self, model: Path | bytes | dict) -> None:
        if isinstance(model, dict):
            self._init_split(model)
            return
        model_bytes = model if isinstance(model, bytes) else Path(model).read_bytes()
        self.source_model_bytes = self.target_model_bytes = model_bytes
        self.tokenizer = Tokenizer(model_bytes)
        sp = self.tokenizer.source_sp
        for token_id, piece in enumerate(SPECIAL_TOKENS):
            if sp.id_to_piece(token_id) != piece:
                raise ValueError(
                    f"SentencePiece model maps id {token_id} to {sp.id_to_piece(token_id)!r}, "
                    f"expected {piece!r}; train it with distill.vocab.train_sentencepiece"
                )
        self._tokens = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        self._ids: dict[str, int] | None = None  # the joint model's own ids are the model's

    @classmethod
    def split(cls, tokens: list[str], source_model: bytes, target_model: bytes) -> Vocab:
        """A vocabulary whose ids are positions in ``tokens`` (which starts with ``SPECIAL_TOKENS``)."""
        return cls({"tokens": list(tokens), "source_spm": bytes(source_model),
                    "target_spm": bytes(target_model)})

    def _init_split(self, state: dict) -> None:
        missing = {"tokens", "source_spm", "target_spm"} - set(state)
        if missing:
            raise ValueError(f"a split vocabulary needs {sorted(missing)} besides {sorted(state)}")
        tokens = [str(token) for token in state["tokens"]]
        if tuple(tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"a vocabulary's first tokens must be {list(SPECIAL_TOKENS)}, "
                             f"got {tokens[: len(SPECIAL_TOKENS)]}")
        ids = {token: i for i, token in enumerate(tokens)}
        if len(ids) != len(tokens):
            repeated = sorted({token for token in tokens if tokens.count(token) > 1})
            raise ValueError(f"a vocabulary lists these tokens more than once: {repeated[:5]}")
        self.source_model_bytes, self.target_model_bytes = state["source_spm"], state["target_spm"]
        self.tokenizer = Tokenizer(self.source_model_bytes, self.target_model_bytes)
        self._tokens, self._ids = tokens, ids

    @property
    def is_joint(self) -> bool:
        return self._ids is None

    @property
    def source_sp(self) -> spm.SentencePieceProcessor:
        return self.tokenizer.source_sp

    @property
    def target_sp(self) -> spm.SentencePieceProcessor:
        return self.tokenizer.target_sp

    def to_state(self) -> bytes | dict:
        """What a checkpoint stores: the joint model's bytes, or the split vocabulary's parts."""
        if self.is_joint:
            return self.source_model_bytes
        return {"tokens": list(self._tokens), "source_spm": self.source_model_bytes,
                "target_spm": self.target_model_bytes}

    @property
    def model_bytes(self) -> bytes:
        """The joint SentencePiece model (a split vocabulary has two: ``source/target_model_bytes``)."""
        self._require_joint("model_bytes", "source_model_bytes and target_model_bytes")
        return self.source_model_bytes

    @property
    def sp(self) -> spm.SentencePieceProcessor:
        """The joint SentencePiece model (a split vocabulary has two: ``source_sp``, ``target_sp``)."""
        self._require_joint("sp", "source_sp and target_sp")
        return self.source_sp

    def _require_joint(self, name: str, instead: str) -> None:
        """A joint vocabulary's text has no side; guessing a split one's would be a silent bug."""
        if not self.is_joint:
            raise ValueError(f"Vocab.{name} exists for a joint vocabulary only; this one has separate "
                             f"source and target SentencePiece models: use {instead}")

    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def tokens(self) -> list[str]:
        return list(self._tokens)

    def piece_to_id(self, piece: str) -> int:
        if self._ids is None:
            return self.source_sp.piece_to_id(piece)
        return self._ids.get(piece, UNK_ID)

    def id_to_piece(self, token_id: int) -> str:
        return self._tokens[token_id]

    def encode_source_pieces(self, text: str) -> list[str]:
        """Pieces of a source sentence, without special tokens."""
        return self.tokenizer.source_pieces(text)

    def encode_target_pieces(self, text: str) -> list[str]:
        """Pieces of a target sentence, without special tokens."""
        return self.tokenizer.target_pieces(text)

    def encode_source(self, text: str) -> list[int]:
        """Ids of a source sentence, without special tokens (callers append ``</s>``)."""
        if self.is_joint:
            return self.source_sp.encode(text, out_type=int)
        return self._ids_of(self.encode_source_pieces(text))

    def encode_target(self, text: str) -> list[int]:
        """Ids of a target sentence, without special tokens."""
        if self.is_joint:
            return self.target_sp.encode(text, out_type=int)
        return self._ids_of(self.encode_target_pieces(text))

    def _ids_of(self, pieces: list[str]) -> list[int]:
        return [self._ids.get(piece, UNK_ID) for piece in pieces]

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` in a joint vocabulary (either side), without special tokens."""
        self._require_joint("encode", "encode_source or encode_target")
        return self.encode_source(text)

    def encode_pieces(self, text: str) -> list[str]:
        self._require_joint("encode_pieces", "encode_source_pieces or encode_target_pieces")
        return self.encode_source_pieces(text)

    def decode(self, ids: Iterable[int]) -> str:
        """The target text of ``ids``; ``<pad>``, ``<s>`` and ``</s>`` are left out."""
        kept = [i for i in ids if i not in (PAD_ID, BOS_ID, EOS_ID)]
        if self.is_joint:
            return self.target_sp.decode(kept)
        return self.tokenizer.decode([self._tokens[i] for i in kept])
