"""Loading CTranslate2 model directories and naming them.

Naming rule (also in the README):

- every directory is served under its own name: the directory name for
  ``--workdir`` (``teacher-int8``), or NAME for ``--model NAME=PATH``;
- when its ``model.json`` has a name and a quantization, ``<name>-<quantization>``
  is an alias too (usually the same as the directory name);
- the bare ``model.json`` name (``teacher``, ``student``) is an alias for the
  variant quantized as ``prefer_quantization`` (default int8), or else for the
  first variant in alphabetical order.

A name given explicitly always wins over an alias.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ctranslate2

from wdserve.artifacts import (
    ArtifactError,
    ExportDir,
    ExportInfo,
    Hypothesis,
    OutputLimit,
    RunDir,
    decode_bounded,
)
from wdserve.errors import WdserveError
from wdserve.pieces import Tokenizer
from wdserve.server.batching import Output

log = logging.getLogger(__name__)


class ModelLoadError(WdserveError, RuntimeError):
    """A model directory is missing, incomplete or unreadable; the message names it."""


@dataclass
class ServedModel:
    """One loaded translator with its tokenizer and exported metadata."""

    name: str
    path: Path
    translator: Any  # ctranslate2.Translator
    tokenizer: Tokenizer  # the export's SentencePiece model(s), cutting as training did
    info: ExportInfo | None = None
    output_limit: OutputLimit = field(default_factory=OutputLimit)

    @property
    def source_lang(self) -> str | None:
        return self.info.source_lang if self.info else None

    @property
    def target_lang(self) -> str | None:
        return self.info.target_lang if self.info else None

    @property
    def max_positions(self) -> int | None:
        """Longest source (pieces + </s>) and output the model has position encodings for, when known."""
        return self.info.max_positions if self.info else None

    def supports(self, source: str | None, target: str | None) -> bool:
        """True when this model translates source -> target (None or 'auto' source matches anything).

        A directory without model.json has unknown languages and accepts any pair.
        """
        source_ok = source in (None, "auto") or self.source_lang is None or source == self.source_lang
        target_ok = target is None or self.target_lang is None or target == self.target_lang
        return source_ok and target_ok

    def encode(self, text: str) -> list[str]:
        """Source pieces; the model appends </s> (add_source_eos), or else ``translate_pieces`` does."""
        return self.tokenizer.source_pieces(text)

    def translate_pieces(self, batch: list[list[str]], beam_size: int, max_length: int) -> list[list[str]]:
        """Blocking CTranslate2 call; run it off the event loop. Outputs obey ``output_limit``."""
        return [output.tokens for output in self.decode(batch, beam_size, max_length)]

    def decode(self, batch: list[list[str]], beam_size: int, max_length: int,
               return_scores: bool = False, num_hypotheses: int = 1) -> list[Hypothesis]:
        """Blocking: output pieces and, with ``return_scores``, their mean token log-probability; with
        ``num_hypotheses`` > 1 also the next best outputs' pieces (``others``)."""
        return decode_bounded(self.translator, batch, beam_size, max_length, self.output_limit,
                              self.tokenizer.source_end, return_scores, num_hypotheses)

    def translate_texts(self, batch: list[list[str]], beam_size: int, max_length: int,
                        return_scores: bool = False, num_hypotheses: int = 1) -> list[Output]:
        """Blocking: source pieces -> detokenized outputs (the batcher's ``TranslateFn``)."""
        decode = self.tokenizer.decode
        return [Output(decode(o.tokens), len(o.tokens), o.log_prob, [decode(tokens) for tokens in o.others])
                for o in self.decode(batch, beam_size, max_length, return_scores, num_hypotheses)]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source_lang": self.source_lang,
            "target_lang": self.target_lang,
            "method": self.info.method if self.info else None,
            "quantization": self.info.quantization if self.info else None,
            "parameters": self.info.parameters if self.info else None,
            "bleu": self.info.bleu if self.info else None,
            "path": str(self.path),
        }


def discover_workdir(workdir: Path) -> dict[str, Path]:
    """Every exported model of a pipeline run, by directory name: ``DIR/export/<name>/``."""
    try:
        return {export.dir_name: export.path for export in RunDir(workdir).exports()}
    except ArtifactError as err:
        raise ModelLoadError(f"workdir {workdir}: {err}") from err


def load_model(name: str, path: Path, device: str = "cpu", compute_type: str = "default",
               intra_threads: int = 1, output_limit: OutputLimit | None = None) -> ServedModel:
    """Loads one directory and runs a one-sentence smoke translation, so a corrupt model fails here."""
    try:
        export = ExportDir.read(path, require_info=False)
    except ArtifactError as err:
        raise ModelLoadError(f"model {name!r}: {err}") from err
    path, info = export.path, export.info
    try:
        tokenizer = Tokenizer.for_export(export)
    except (ArtifactError, OSError, RuntimeError) as err:
        raise ModelLoadError(f"model {name!r}: cannot load its SentencePiece model: {err}") from err
    try:
        # inter_threads=1: the server runs at most one batch per model at a time and
        # bounds concurrency across models with its own worker pool (see settings.thread_plan).
        translator = ctranslate2.Translator(
            str(path), device=device, compute_type=compute_type, inter_threads=1, intra_threads=intra_threads)
        model = ServedModel(name=name, path=path, translator=translator, tokenizer=tokenizer, info=info,
                            output_limit=output_limit or OutputLimit())
        model.translate_pieces([model.encode("test")], beam_size=1, max_length=4)
    except (RuntimeError, ValueError, OSError) as err:
        raise ModelLoadError(f"model {name!r}: CTranslate2 cannot load {path}: {err}") from err
    log.info("loaded %s from %s (%s -> %s, %s)", name, path, model.source_lang, model.target_lang,
             info.quantization if info else "?")
    return model


def build_aliases(models: dict[str, ServedModel], prefer_quantization: str) -> dict[str, str]:
    """alias -> served name, following the naming rule in this module's docstring."""
    aliases: dict[str, str] = {}
    variants: dict[str, list[ServedModel]] = {}
    for served in sorted(models.values(), key=lambda m: m.name):
        base, quant = (served.info.name, served.info.quantization) if served.info else (None, None)
        if base and quant:
            aliases.setdefault(f"{base}-{quant}", served.name)
        if base:
            variants.setdefault(base, []).append(served)
    for base, group in variants.items():
        preferred = [m for m in group if m.info and m.info.quantization == prefer_quantization]
        aliases.setdefault(base, (preferred or group)[0].name)
    return {alias: target for alias, target in aliases.items() if alias not in models}


class ModelRegistry:
    """The loaded models plus their aliases; resolves what a request names."""

    def __init__(self, models: dict[str, ServedModel], prefer_quantization: str = "int8"):
        self.models = dict(models)
        self.aliases = build_aliases(self.models, prefer_quantization)

    @classmethod
    def load(cls, specs: dict[str, Path], device: str = "cpu", compute_type: str = "default",
             intra_threads: int = 1, prefer_quantization: str = "int8",
             output_limit: OutputLimit | None = None) -> ModelRegistry:
        if not specs:
            raise ModelLoadError("no models to serve: give --workdir DIR or --model NAME=PATH")
        models: dict[str, ServedModel] = {}
        for name, path in specs.items():
            models[name] = load_model(name, path, device, compute_type, intra_threads, output_limit)
        return cls(models, prefer_quantization)

    def resolve(self, name: str) -> ServedModel | None:
        return self.models.get(name) or self.models.get(self.aliases.get(name, ""))

    def names(self) -> list[str]:
        return sorted(self.models) + sorted(self.aliases)

    def aliases_of(self, name: str) -> list[str]:
        return sorted(alias for alias, target in self.aliases.items() if target == name)

    def pairs(self) -> set[tuple[str, str]]:
        return {(m.source_lang, m.target_lang) for m in self.models.values()
                if m.source_lang and m.target_lang}

    def close(self) -> None:
        for served in self.models.values():
            served.translator.unload_model()
