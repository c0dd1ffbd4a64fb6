"""Parallel corpora: reading (plain or gzip), cleaning, and atomic writing.

A corpus is two line-aligned UTF-8 files, one sentence per line. Every problem
found while reading raises ``DataError`` naming the file, because the user fixes
files, not tracebacks.
"""

from __future__ import annotations

import gzip
import logging
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from wdserve.errors import WdserveError

log = logging.getLogger(__name__)

GZIP_MAGIC = b"\x1f\x8b"
MULTI30K_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw"
MULTI30K_SPLITS = ("train", "val", "test_2016_flickr")
MULTI30K_LANGUAGES = ("de", "en", "fr")


class DataError(WdserveError, ValueError):
    """A corpus file is missing, unreadable, malformed, or does not pair up with its other side."""


def read_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 text file, gzip-compressed or not (told by its first bytes), without newlines."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"corpus file not found: {path}")
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
        if raw[:2] == GZIP_MAGIC:
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"cannot read {path}: {err}") from err
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path} is not UTF-8 text (bad byte at line {line}): {err.reason}") from err
    lines = text.split("\n")
    if lines and lines[-1] == "":  # a final newline ends the last line, it does not start a new one
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def read_parallel(src_path: Path, tgt_path: Path) -> list[tuple[str, str]]:
    """Line-aligned (source, target) pairs; raises DataError when the sides disagree or are empty."""
    sources, targets = read_lines(src_path), read_lines(tgt_path)
    if len(sources) != len(targets):
        raise DataError(
            f"parallel files differ in length: {src_path} has {len(sources)} lines, "
            f"{tgt_path} has {len(targets)}"
        )
    if not sources:
        raise DataError(f"empty corpus: {src_path} and {tgt_path} have no lines")
    return list(zip(sources, targets, strict=True))


@dataclass
class CleanReport:
    """How many pairs ``clean_pairs`` kept, and how many it dropped for each reason."""

    total: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def summary(self) -> str:
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.dropped.items()))
        return f"kept {self.kept} of {self.total} pairs" + (f" (dropped {reasons})" if reasons else "")


def clean_pairs(
    pairs: Iterable[tuple[str, str]],
    max_words: int = 100,
    max_chars: int = 1000,
    max_ratio: float = 3.0,
    min_words_for_ratio: int = 3,
) -> tuple[list[tuple[str, str]], CleanReport]:
    """Drops pairs that would only teach noise; surrounding whitespace is stripped from kept pairs.

    Reasons, checked in this order: ``empty`` (either side blank), ``too long`` (either side
    over ``max_words`` words or ``max_chars`` characters), ``length ratio`` (one side more
    than ``max_ratio`` times as many words as the other, checked only when the longer side has
    at least ``min_words_for_ratio`` words, since "Ja." / "Yes, I do." is a fine pair).
    """
    kept: list[tuple[str, str]] = []
    report = CleanReport()
    for source, target in pairs:
        report.total += 1
        source, target = source.strip(), target.strip()
        src_words, tgt_words = len(source.split()), len(target.split())
        longer, shorter = max(src_words, tgt_words), min(src_words, tgt_words)
        if not source or not target:
            report.drop("empty")
        elif longer > max_words or max(len(source), len(target)) > max_chars:
            report.drop("too long")
        elif longer >= min_words_for_ratio and longer > max_ratio * shorter:
            report.drop("length ratio")
        else:
            kept.append((source, target))
    report.kept = len(kept)
    if report.dropped:
        log.info("cleaning: %s", report.summary())
    return kept, report


def write_parallel(pairs: Iterable[tuple[str, str]], src_path: Path, tgt_path: Path) -> None:
    """Writes the two sides as UTF-8 lines, each file atomically (temporary file, then rename)."""
    from wdserve.distill.checkpoint import (
        atomic_save_text,  # imports PyTorch; keep `import distill.data` light
    )

    pairs = list(pairs)
    for source, target in pairs:
        if "\n" in source or "\n" in target:
            raise DataError(f"a sentence contains a newline and would break line alignment: {source!r}")
    atomic_save_text("".join(f"{s}\n" for s, _ in pairs), Path(src_path))
    atomic_save_text("".join(f"{t}\n" for _, t in pairs), Path(tgt_path))


def download_multi30k(
    out_dir: Path,
    base_url: str = MULTI30K_URL,
    splits: Iterable[str] = MULTI30K_SPLITS,
    languages: Iterable[str] = MULTI30K_LANGUAGES,
    timeout: float = 60.0,
) -> list[Path]:
    """Downloads Multi30k task 1 files ``{split}.{lang}.gz`` into ``out_dir``; files present are kept.

    Each file is checked to be readable gzip text before it is renamed into place.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for split in splits:
        for lang in languages:
            path = out_dir / f"{split}.{lang}.gz"
            paths.append(path)
            if path.is_file():
                log.info("already present: %s", path)
                continue
            url = f"{base_url.rstrip('/')}/{path.name}"
            log.info("downloading %s", url)
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    payload = response.read()
            except (urllib.error.URLError, OSError) as err:
                reason = getattr(err, "reason", err)
                raise DataError(
                    f"cannot download {url}: {reason}. Without internet access, point the config's "
                    f"data.dir (or --data-dir / $WDSERVE_DATA_DIR) at an existing copy of Multi30k "
                    f"(its train, val and test_2016_flickr files, plain or .gz)"
                ) from err
            if payload[:2] != GZIP_MAGIC:
                raise DataError(f"{url} did not return a gzip file (got {len(payload)} bytes)")
            tmp = path.with_name(f".{path.name}.part")
            tmp.write_bytes(payload)
            try:
                read_lines(tmp)
            except DataError:
                tmp.unlink()
                raise
            tmp.replace(path)
    return paths
