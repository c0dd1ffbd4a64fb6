"""Joint SentencePiece vocabulary whose special tokens match CTranslate2's defaults.

Ids 0-3 are ``<pad> <unk> <s> </s>`` (see ``distill.model``), so the token list
written into a CTranslate2 model and the ids the PyTorch model was trained on
agree by construction.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from wdserve.distill.model import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, UNK_ID

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
    """Encodes text to ids and back with a SentencePiece model (from a file or its bytes)."""

    def __init__(self, model: Path | bytes) -> None:
        self.model_bytes = model if isinstance(model, bytes) else Path(model).read_bytes()
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_bytes)
        for token_id, piece in enumerate(SPECIAL_TOKENS):
            if self.sp.id_to_piece(token_id) != piece:
                raise ValueError(
                    f"SentencePiece model maps id {token_id} to {self.sp.id_to_piece(token_id)!r}, "
                    f"expected {piece!r}; train it with distill.vocab.train_sentencepiece"
                )

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    @property
    def tokens(self) -> list[str]:
        return [self.sp.id_to_piece(i) for i in range(len(self))]

    def encode(self, text: str) -> list[int]:
        """Pieces of ``text`` without special tokens."""
        return self.sp.encode(text, out_type=int)

    def encode_pieces(self, text: str) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([i for i in ids if i not in (PAD_ID, BOS_ID, EOS_ID)])
