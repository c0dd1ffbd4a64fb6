"""The files the stages hand each other, described once.

- ``RunDir``: the layout of a pipeline run directory (``wdserve pipeline --workdir DIR``),
  which the pipeline writes and ``wdserve serve --workdir`` and ``wdserve bench`` read.
- ``ExportInfo`` and ``ExportDir``: a CTranslate2 model directory as ``wdserve export``
  writes it (the CTranslate2 files, the SentencePiece model(s) and ``model.json``, which names
  them: ``sentencepiece.model`` for a joint vocabulary, ``source.spm`` and ``target.spm`` for an
  imported Marian teacher's and its students').
- ``OutputLimit`` and ``decode_bounded`` (``translate_bounded`` without scores): how long an
  output may get. Every path that decodes (PyTorch search, sequence-level KD, evaluation, the
  server, the bench's direct baseline) holds sentence i to ``ratio x (source pieces + </s>) +
  margin`` tokens, so the BLEU the pipeline reports is the BLEU the service delivers.

Standard library only: the server and the load tester import it without PyTorch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

from wdserve.errors import WdserveError

CHECKPOINT = "checkpoint_best.pt"
CT2_MODEL = "model.bin"
CT2_CONFIG = "config.json"  # CTranslate2's own: special tokens, add_source_eos, ...
EXPORT_INFO = "model.json"
EXPORT_VOCAB = "sentencepiece.model"  # a joint vocabulary: one SentencePiece model for both languages
EXPORT_SOURCE_VOCAB, EXPORT_TARGET_VOCAB = "source.spm", "target.spm"  # one per language (Marian's names)
TEACHER = "teacher"
SPLITS = ("train", "valid", "test")
QUANTIZATIONS = ("int8", "int8_float16", "float16", "bfloat16", "float32")  # what `wdserve export` writes

DEFAULT_MAX_LENGTH = 256  # output tokens when a caller gives no cap (the server's default_max_length)


class ArtifactError(WdserveError):
    """A run or export directory that is missing, incomplete or unreadable; the message names the file."""


# ---------------------------------------------------------------------------------------------------
# The run directory
@dataclass(frozen=True)
class RunDir:
    """``DIR/data/{split}.{src,tgt}``, ``DIR/vocab/spm.model``, ``DIR/seqkd/train.tgt``,
    ``DIR/models/<name>/checkpoint_best.pt``, ``DIR/export/<name>-<quantization>/``,
    ``DIR/report.json`` and ``DIR/bench/``."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def data(self, split: str, side: str) -> Path:
        """``side`` is ``src`` or ``tgt``."""
        return self.data_dir / f"{split}.{side}"

    @property
    def vocab(self) -> Path:
        return self.root / "vocab" / "spm.model"

    @property
    def seqkd_targets(self) -> Path:
        return self.root / "seqkd" / "train.tgt"

    def model_dir(self, name: str) -> Path:
        return self.root / "models" / name

    def checkpoint(self, name: str) -> Path:
        return self.model_dir(name) / CHECKPOINT

    @property
    def exports_root(self) -> Path:
        return self.root / "export"

    def export_dir(self, name: str, quantization: str) -> Path:
        return self.exports_root / f"{name}-{quantization}"

    @property
    def report(self) -> Path:
        return self.root / "report.json"

    @property
    def bench(self) -> Path:
        return self.root / "bench"

    def exports(self) -> list[ExportDir]:
        """Every described export (``export/*/model.json``), the teacher first, then by name and
        quantization; raises ``ArtifactError`` when there is none."""
        if not self.exports_root.is_dir():
            raise ArtifactError(f"{self.root}: no export/ directory (run `wdserve pipeline` first)")
        found = [ExportDir.read(info.parent) for info in sorted(self.exports_root.glob(f"*/{EXPORT_INFO}"))]
        if not found:
            raise ArtifactError(f"{self.exports_root} holds no */{EXPORT_INFO}: nothing exported yet "
                                "(run `wdserve pipeline` or `wdserve export`)")
        return sorted(found, key=lambda e: (e.info.name != TEACHER, e.info.name, e.info.quantization))


# ---------------------------------------------------------------------------------------------------
# The export directory
@dataclass(frozen=True)
class ExportInfo:
    """``model.json``: what an export is and where it came from."""

    name: str  # the checkpoint's model name: teacher, student, student-kd
    quantization: str
    source_lang: str | None = None
    target_lang: str | None = None
    method: str | None = None
    architecture: dict[str, Any] = field(default_factory=dict)  # the ModelConfig fields
    parameters: int | None = None
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    teacher_sha256: str | None = None
    exported_at: str | None = None
    bleu: float | None = None  # test BLEU of the checkpoint, when the pipeline's evaluate stage has run
    # The SentencePiece files that cut source text and join output pieces; one file named twice is a
    # joint vocabulary. The defaults are what every export had before split vocabularies existed.
    source_vocab: str = EXPORT_VOCAB
    target_vocab: str = EXPORT_VOCAB

    @property
    def max_positions(self) -> int | None:
        """Longest source (pieces + </s>) and output the model has position encodings for."""
        value = self.architecture.get("max_positions")
        return int(value) if value is not None else None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ExportInfo:
        """Unknown keys are ignored, so an older wdserve reads a newer description."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None}, indent=2) + "\n"


@dataclass(frozen=True)
class ExportDir:
    """A CTranslate2 model directory with its SentencePiece model(s), and its description when it has one
    (``wdserve serve --model NAME=PATH`` also takes directories written by other tools: without
    ``model.json`` the vocabulary is ``sentencepiece.model``, or else ``source.spm`` and ``target.spm``,
    the files an OPUS-MT model ships and ``ct2-transformers-converter --copy_files`` copies)."""

    path: Path
    info: ExportInfo | None

    @classmethod
    def read(cls, path: Path, require_info: bool = True) -> ExportDir:
        path = Path(path)
        if not path.is_dir():
            raise ArtifactError(f"{path} does not exist or is not a directory")
        if not (path / CT2_MODEL).is_file():
            raise ArtifactError(f"{path} is not an exported model: {CT2_MODEL} is missing "
                                "(create one with `wdserve export`)")
        info_path = path / EXPORT_INFO
        if not info_path.is_file():
            if require_info:
                raise ArtifactError(f"{path}: {EXPORT_INFO} is missing (create it with `wdserve export`)")
            export = cls(path, None)
        else:
            try:
                values = json.loads(info_path.read_text(encoding="utf-8"))
                if not isinstance(values, dict):
                    raise TypeError("not a JSON object")
                export = cls(path, ExportInfo.from_dict(values))
            except (OSError, UnicodeDecodeError, ValueError, TypeError) as err:
                raise ArtifactError(f"{info_path}: not a wdserve export description ({err})") from err
        export._check_vocab_files()
        return export

    def _vocab_files(self) -> tuple[str, str]:
        """(source, target) SentencePiece file names: ``model.json``'s, or the ones present."""
        if self.info is not None:
            return self.info.source_vocab, self.info.target_vocab
        if not (self.path / EXPORT_VOCAB).is_file() and all(
                (self.path / name).is_file() for name in (EXPORT_SOURCE_VOCAB, EXPORT_TARGET_VOCAB)):
            return EXPORT_SOURCE_VOCAB, EXPORT_TARGET_VOCAB
        return EXPORT_VOCAB, EXPORT_VOCAB

    def _check_vocab_files(self) -> None:
        what = (f"the SentencePiece model {EXPORT_INFO} names" if self.info is not None else
                f"the SentencePiece model, or {EXPORT_SOURCE_VOCAB} and {EXPORT_TARGET_VOCAB} for one per "
                "language")
        for name in dict.fromkeys(self._vocab_files()):
            if not isinstance(name, str) or not name or Path(name).name != name:
                raise ArtifactError(f"{self.path / EXPORT_INFO}: vocabulary file {name!r} is not a file "
                                    "name inside the model directory")
            if not (self.path / name).is_file():
                raise ArtifactError(f"{self.path} is not an exported model: {name} is missing ({what}; "
                                    "create one with `wdserve export`)")

    @staticmethod
    def write_info(path: Path, info: ExportInfo) -> None:
        (Path(path) / EXPORT_INFO).write_text(info.to_json(), encoding="utf-8")

    @property
    def source_vocab(self) -> Path:
        """The SentencePiece model that cuts source text into pieces."""
        return self.path / self._vocab_files()[0]

    @property
    def target_vocab(self) -> Path:
        """The SentencePiece model that joins output pieces into text (the source one when joint)."""
        return self.path / self._vocab_files()[1]

    @property
    def ct2_config(self) -> dict[str, Any]:
        """CTranslate2's ``config.json`` of the model (empty when there is none)."""
        path = self.path / CT2_CONFIG
        if not path.is_file():
            return {}
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise ArtifactError(f"{path}: not a CTranslate2 model configuration ({err})") from err
        return values if isinstance(values, dict) else {}

    @property
    def dir_name(self) -> str:
        """The directory name, which ``wdserve serve --workdir`` serves it under."""
        return self.path.name

    @property
    def max_positions(self) -> int | None:
        return self.info.max_positions if self.info else None


# ---------------------------------------------------------------------------------------------------
# How long an output may get
@dataclass(frozen=True)
class OutputLimit:
    """Each sentence's output limit: ``ratio x (source pieces + </s>) + margin`` tokens, ``</s>`` included.

    Without it a beam search that falls into a repetition loop runs to the call's cap, and
    length normalization makes that loop the winner: on the Multi30k teacher, 256-token
    loops cost 2 BLEU. fairseq calls the two numbers ``max_len_a`` and ``max_len_b``.
    """

    ratio: float = 1.5
    margin: int = 10

    def tokens(self, source_pieces: int, max_length: int) -> int:
        """The limit of one sentence of ``source_pieces`` pieces (without ``</s>``), within ``max_length``."""
        return max(1, min(max_length, int(self.ratio * (source_pieces + 1) + self.margin)))


DEFAULT_OUTPUT_LIMIT = OutputLimit()  # what `wdserve serve` applies unless told otherwise


class Hypothesis(NamedTuple):
    """One output of ``decode_bounded``: its pieces and, when asked for, CTranslate2's score of them."""

    tokens: list[str]
    # CTranslate2's score with its default length_penalty of 1: the sum of the output's token
    # log-probabilities over its length, </s> included, i.e. the mean log-probability per token
    # (a test checks it against score_batch). None unless return_scores was given.
    log_prob: float | None = None
    # the next best outputs' pieces, best first, when num_hypotheses > 1 was asked for (n-best list)
    others: tuple[list[str], ...] = ()


def decode_bounded(translator: Any, batch: list[list[str]], beam_size: int, max_length: int,
                   limit: OutputLimit = DEFAULT_OUTPUT_LIMIT, source_end: Sequence[str] = (),
                   return_scores: bool = False, num_hypotheses: int = 1) -> list[Hypothesis]:
    """``ctranslate2.Translator.translate_batch`` with every sentence held to its own ``limit``.

    CTranslate2's ``max_decoding_length`` applies to a whole call, so the batch runs
    once under its longest sentence's limit, and the few outputs that went past their
    own limit (repetition loops, in practice) are translated again under it.
    ``source_end`` goes after every source's pieces when the model does not append ``</s>``
    itself (``wdserve.pieces.Tokenizer.source_end``); the limit counts ``</s>`` either way.
    ``return_scores`` asks CTranslate2 for each output's score (off by default: only callers
    that use it pay for it, though on the tiny models it cost nothing measurable).
    ``num_hypotheses`` > 1 keeps that many outputs of CTranslate2's n-best list (the best as the
    hypothesis, the rest as its ``others``), widening the beam to hold them as CTranslate2
    requires; a sentence any of whose outputs went past its limit runs again.
    """
    if not batch:
        return []
    limits = [limit.tokens(len(pieces), max_length) for pieces in batch]
    longest = max(limits)
    if source_end:
        batch = [[*pieces, *source_end] for pieces in batch]
    options: dict[str, Any] = {"beam_size": max(beam_size, num_hypotheses), "num_hypotheses": num_hypotheses}
    if return_scores:  # only when asked, so calls without it stay exactly what they were
        options["return_scores"] = True

    def hypothesis(result: Any) -> Hypothesis:
        return Hypothesis(result.hypotheses[0], result.scores[0] if return_scores else None,
                          tuple(result.hypotheses[1:]))

    outputs = [hypothesis(result) for result in translator.translate_batch(
        batch, max_decoding_length=longest, **options)]
    again: dict[int, list[int]] = {}
    for i, output in enumerate(outputs):
        longest_output = max(len(tokens) for tokens in (output.tokens, *output.others))
        if limits[i] < longest and longest_output >= limits[i]:
            again.setdefault(limits[i], []).append(i)
    for own_limit, indices in again.items():
        results = translator.translate_batch([batch[i] for i in indices], max_decoding_length=own_limit,
                                             **options)
        for i, result in zip(indices, results, strict=True):
            outputs[i] = hypothesis(result)
    return outputs


def translate_bounded(translator: Any, batch: list[list[str]], beam_size: int, max_length: int,
                      limit: OutputLimit = DEFAULT_OUTPUT_LIMIT,
                      source_end: Sequence[str] = ()) -> list[list[str]]:
    """The output pieces of ``decode_bounded`` (no scores)."""
    return [output.tokens for output in decode_bounded(translator, batch, beam_size, max_length, limit,
                                                       source_end)]


def translate_corpus(translator: Any, sources: Sequence[list[str]], beam_size: int, batch_size: int,
                     max_length: int = DEFAULT_MAX_LENGTH, limit: OutputLimit = DEFAULT_OUTPUT_LIMIT,
                     max_positions: int | None = None, sort_by_length: bool = True,
                     source_end: Sequence[str] = (), return_scores: bool = False
                     ) -> Iterator[tuple[list[int], list[Any]]]:
    """Pieces in, pieces out, ``batch_size`` sentences at a time, decoded as the server decodes a
    request: each sentence held to ``limit``, the call to ``max_length`` and both to the model's
    ``max_positions`` (longer sources are cut to fit, where the server refuses them), with
    ``source_end`` as in ``translate_bounded``.

    Yields ``(indices, outputs)`` per batch so callers can report progress; batches hold sentences
    of similar length unless ``sort_by_length`` is False (then they come in the given order). The
    outputs are pieces, or with ``return_scores`` ``Hypothesis`` tuples (pieces and score).
    """
    if max_positions:
        max_length = min(max_length, max_positions)
        sources = [pieces[: max_positions - 1] for pieces in sources]
    order = sorted(range(len(sources)), key=lambda i: len(sources[i])) if sort_by_length \
        else list(range(len(sources)))
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        outputs = decode_bounded(translator, [sources[i] for i in indices], beam_size, max_length, limit,
                                 source_end, return_scores)
        yield indices, outputs if return_scores else [output.tokens for output in outputs]
