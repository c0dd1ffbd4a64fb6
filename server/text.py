"""Checking request text and cutting it into sentences.

The splitter is deliberately small: a sentence ends at ``.``, ``!``, ``?`` or
``…`` (optionally followed by closing quotes or brackets) when whitespace and
then an upper-case letter, a digit or an opening quote follow, unless the word
before the full stop is a known abbreviation ("Dr.", "e.g.") or a single
capital letter (an initial, "J. Smith"). Line breaks always end a segment and
are kept verbatim. It does not know about languages without case (Chinese,
Japanese), where text is translated as one segment per line.
"""

from __future__ import annotations

import re
import unicodedata

ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "vs", "etc", "e.g", "i.e", "cf", "no",
    "fig", "approx", "inc", "ltd", "co", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept",
    "oct", "nov", "dec", "z.b", "bzw", "usw", "ca", "nr", "hr", "fr", "str",
})

_SENTENCE_END = re.compile(r"[.!?…]+[\"'”’»)\]]*(?P<space>[ \t]+)(?=[\"'“‘«(\[]?\w)")
_LINE_BREAK = re.compile(r"(\s*\n\s*)")
_WORD_BEFORE = re.compile(r"(\w[\w.]*)$")


class TextError(ValueError):
    """A client sent text the server will not translate; the message says which and why."""


def _ends_with_abbreviation(text: str) -> bool:
    match = _WORD_BEFORE.search(text)
    if not match:
        return False
    word = match.group(1)
    return word.lower() in ABBREVIATIONS or (len(word) == 1 and word.isupper())


def _split_line(line: str) -> tuple[list[str], list[str]]:
    sentences: list[str] = []
    separators: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(line):
        next_char = line[match.end():].lstrip("\"'“‘«([")[:1]
        if not (next_char.isupper() or next_char.isdigit()):
            continue
        if line[match.start()] == "." and _ends_with_abbreviation(line[start:match.start()]):
            continue
        sentences.append(line[start:match.start("space")])
        separators.append(match.group("space"))
        start = match.end()
    sentences.append(line[start:])
    return sentences, separators


def split_sentences(text: str) -> tuple[list[str], list[str]]:
    """``text`` -> (segments, separators) with ``len(separators) == len(segments) - 1``.

    ``join_sentences(*split_sentences(t))`` gives back ``t`` without its leading and
    trailing whitespace; runs of blank lines stay inside the separators, so no
    segment is empty unless ``t`` is.
    """
    parts = _LINE_BREAK.split(text.strip())
    lines, breaks = parts[0::2], parts[1::2]
    segments: list[str] = []
    separators: list[str] = []
    for index, line in enumerate(lines):
        if index:
            separators.append(breaks[index - 1])
        line_segments, line_separators = _split_line(line)
        segments += line_segments
        separators += line_separators
    return segments, separators


def join_sentences(segments: list[str], separators: list[str]) -> str:
    """Inverse of :func:`split_sentences` (with translated segments in place of the originals)."""
    if len(separators) != len(segments) - 1:
        raise ValueError("need exactly one separator between consecutive segments")
    parts = [segments[0]]
    for separator, segment in zip(separators, segments[1:], strict=True):
        parts += [separator, segment]
    return "".join(parts)


# what check_text refuses, as one character class so that ordinary text is scanned in C rather than
# character by character in Python: surrogates, control characters (category Cc: U+0000-U+001F and
# U+007F-U+009F) other than tab and line breaks, and the noncharacters U+xFFFE and U+xFFFF of every plane
_NONCHARACTERS = "".join(chr(plane << 16 | low) for plane in range(17) for low in (0xFFFE, 0xFFFF))
_REFUSED_CHAR = re.compile(f"[\ud800-\udfff\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f{_NONCHARACTERS}]")


def check_text(text: str, max_chars: int, where: str = "q") -> None:
    """Raises TextError for text the server refuses: empty, too long, not encodable, control characters."""
    if not text.strip():
        raise TextError(f"{where} is empty or whitespace only")
    if len(text) > max_chars:
        raise TextError(f"{where} has {len(text)} characters; the limit is {max_chars}")
    refused = _REFUSED_CHAR.search(text)
    if refused is None:
        return
    index, code = refused.start(), ord(refused.group())
    if 0xD800 <= code <= 0xDFFF:
        raise TextError(f"{where} is not valid UTF-8 text (lone surrogate U+{code:04X} at {index})")
    if unicodedata.category(refused.group()) == "Cc":
        raise TextError(f"{where} contains control character U+{code:04X} at position {index}")
    raise TextError(f"{where} contains noncharacter U+{code:04X} at position {index}")
