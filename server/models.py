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

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ctranslate2
import sentencepiece as spm

from wdserve.errors import WdserveError
from wdserve.server.settings import OutputLimit

log = logging.getLogger(__name__)

SPM_FILE = "sentencepiece.model"
INFO_FILE = "model.json"


class ModelLoadError(WdserveError, RuntimeError):
    """A model directory is missing, incomplete or unreadable; the message names it."""


def translate_bounded(translator: Any, batch: list[list[str]], beam_size: int, max_length: int,
                      limit: OutputLimit) -> list[list[str]]:
    """``translate_batch`` with every sentence held to its own ``limit``.

    CTranslate2's ``max_decoding_length`` applies to a whole call, so the batch runs
    once under its longest sentence's limit, and the few outputs that went past their
    own limit (repetition loops, in practice) are translated again under it.
    """
    if not batch:
        return []
    limits = [limit.tokens(len(pieces), max_length) for pieces in batch]
    longest = max(limits)
    outputs = [result.hypotheses[0] for result in translator.translate_batch(
        batch, beam_size=beam_size, max_decoding_length=longest, num_hypotheses=1)]
    again: dict[int, list[int]] = {}
    for i, output in enumerate(outputs):
        if limits[i] < longest and len(output) >= limits[i]:
            again.setdefault(limits[i], []).append(i)
    for own_limit, indices in again.items():
        results = translator.translate_batch([batch[i] for i in indices], beam_size=beam_size,
                                             max_decoding_length=own_limit, num_hypotheses=1)
        for i, result in zip(indices, results, strict=True):
            outputs[i] = result.hypotheses[0]
    return outputs


@dataclass
class ServedModel:
    """One loaded translator with its tokenizer and exported metadata."""

    name: str
    path: Path
    translator: Any  # ctranslate2.Translator
    tokenizer: spm.SentencePieceProcessor
    info: dict[str, Any] = field(default_factory=dict)
    output_limit: OutputLimit = field(default_factory=OutputLimit)

    @property
    def source_lang(self) -> str | None:
        return self.info.get("source_lang")

    @property
    def target_lang(self) -> str | None:
        return self.info.get("target_lang")

    @property
    def max_positions(self) -> int | None:
        """Longest source (pieces + </s>) and output the model has position encodings for, when known."""
        return (self.info.get("architecture") or {}).get("max_positions")

    def supports(self, source: str | None, target: str | None) -> bool:
        """True when this model translates source -> target (None or 'auto' source matches anything).

        A directory without model.json has unknown languages and accepts any pair.
        """
        source_ok = source in (None, "auto") or self.source_lang is None or source == self.source_lang
        target_ok = target is None or self.target_lang is None or target == self.target_lang
        return source_ok and target_ok

    def encode(self, text: str) -> list[str]:
        """Source pieces; the model itself appends </s> (add_source_eos)."""
        return self.tokenizer.encode(text, out_type=str)

    def translate_pieces(self, batch: list[list[str]], beam_size: int, max_length: int) -> list[list[str]]:
        """Blocking CTranslate2 call; run it off the event loop. Outputs obey ``output_limit``."""
        return translate_bounded(self.translator, batch, beam_size, max_length, self.output_limit)

    def translate_texts(self, batch: list[list[str]], beam_size: int,
                        max_length: int) -> list[tuple[str, int]]:
        """Blocking: source pieces -> (detokenized output, output token count) per sentence."""
        return [(self.tokenizer.decode_pieces(pieces), len(pieces))
                for pieces in self.translate_pieces(batch, beam_size, max_length)]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source_lang": self.source_lang,
            "target_lang": self.target_lang,
            "method": self.info.get("method"),
            "quantization": self.info.get("quantization"),
            "parameters": self.info.get("parameters"),
            "path": str(self.path),
        }


def discover_workdir(workdir: Path) -> dict[str, Path]:
    """Every exported model of a pipeline run: ``DIR/export/<name>/model.json`` -> {name: dir}."""
    export_dir = Path(workdir) / "export"
    if not export_dir.is_dir():
        raise ModelLoadError(f"workdir {workdir}: no export/ directory (run the pipeline first)")
    found = {info.parent.name: info.parent for info in sorted(export_dir.glob(f"*/{INFO_FILE}"))}
    if not found:
        raise ModelLoadError(f"workdir {workdir}: export/ holds no */{INFO_FILE}; nothing to serve")
    return found


def read_info(name: str, path: Path) -> dict[str, Any]:
    """model.json as a dict ({} when the directory has none)."""
    info_path = path / INFO_FILE
    if not info_path.exists():
        return {}
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"model {name!r}: cannot read {info_path}: {err}") from err
    if not isinstance(info, dict):
        raise ModelLoadError(f"model {name!r}: {info_path} is not a JSON object")
    return info


def load_model(name: str, path: Path, device: str = "cpu", compute_type: str = "default",
               intra_threads: int = 1, output_limit: OutputLimit | None = None) -> ServedModel:
    """Loads one directory and runs a one-sentence smoke translation, so a corrupt model fails here."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model {name!r}: directory {path} does not exist")
    spm_path = path / SPM_FILE
    if not spm_path.is_file():
        raise ModelLoadError(f"model {name!r}: {spm_path} is missing (the source/target SentencePiece model)")
    info = read_info(name, path)
    tokenizer = spm.SentencePieceProcessor()
    try:
        tokenizer.Load(str(spm_path))
    except (OSError, RuntimeError) as err:
        raise ModelLoadError(f"model {name!r}: cannot load {spm_path}: {err}") from err
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
             info.get("quantization", "?"))
    return model


def build_aliases(models: dict[str, ServedModel], prefer_quantization: str) -> dict[str, str]:
    """alias -> served name, following the naming rule in this module's docstring."""
    aliases: dict[str, str] = {}
    variants: dict[str, list[ServedModel]] = {}
    for served in sorted(models.values(), key=lambda m: m.name):
        base, quant = served.info.get("name"), served.info.get("quantization")
        if base and quant:
            aliases.setdefault(f"{base}-{quant}", served.name)
        if base:
            variants.setdefault(base, []).append(served)
    for base, group in variants.items():
        preferred = [m for m in group if m.info.get("quantization") == prefer_quantization]
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
