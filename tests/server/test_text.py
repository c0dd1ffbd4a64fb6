"""Sentence splitting and text checks (server.text)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wdserve.server.text import TextError, check_text, join_sentences, split_sentences


@pytest.mark.parametrize(("text", "sentences"), [
    ("One sentence", ["One sentence"]),
    ("Hello world. How are you? Fine!", ["Hello world.", "How are you?", "Fine!"]),
    ('He said "Stop." Then he left.', ['He said "Stop."', "Then he left."]),
    ('It ended. "Really?" she asked.', ["It ended.", '"Really?" she asked.']),
    ("Dr. Smith met Mr. Jones. They talked.", ["Dr. Smith met Mr. Jones.", "They talked."]),
    ("J. R. R. Tolkien wrote it. It sold.", ["J. R. R. Tolkien wrote it.", "It sold."]),
    ("e.g. this one. And that.", ["e.g. this one.", "And that."]),
    ("Version 2.5 is out. 3 bugs fixed.", ["Version 2.5 is out.", "3 bugs fixed."]),
    ("lower case after a stop. stays together", ["lower case after a stop. stays together"]),
    ("Wait... What? Über alles. Ça va.", ["Wait...", "What?", "Über alles.", "Ça va."]),
    ("Line one\nLine two", ["Line one", "Line two"]),
    ("  padded.  Next one.  ", ["padded.", "Next one."]),
])
def test_split_sentences(text: str, sentences: list[str]) -> None:
    assert split_sentences(text)[0] == sentences


def test_separators_and_blank_lines_are_kept() -> None:
    segments, separators = split_sentences("First.  Second.\n\nThird")
    assert segments == ["First.", "Second.", "Third"]
    assert separators == ["  ", "\n\n"]
    assert join_sentences(["1", "2", "3"], separators) == "1  2\n\n3"
    with pytest.raises(ValueError, match="separator"):
        join_sentences(["1", "2"], [])


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_split_then_join_gives_back_the_stripped_text(text: str) -> None:
    segments, separators = split_sentences(text)
    assert len(separators) == len(segments) - 1
    assert join_sentences(segments, separators) == text.strip()
    if text.strip():
        assert all(segment.strip() for segment in segments)


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty"), ("  \t\n", "empty"), ("x" * 11, "limit is 10"), ("a\x00b", "U+0000"),
    ("a\x1bb", "U+001B"), ("a\x7fb", "U+007F"), ("a\x9fb", "U+009F"), ("a\ud83db", "surrogate"),
    ("a\uffffb", "noncharacter U+FFFF"),
])
def test_check_text_rejects(text: str, message: str) -> None:
    with pytest.raises(TextError, match=re.escape(message)):
        check_text(text, max_chars=10)


def test_check_text_accepts_ordinary_text() -> None:
    for text in ("Tab\there", "two\nlines\r\n", "Grüße, 世界 👋", "x" * 10):
        check_text(text, max_chars=10 if len(text) <= 10 else 100)
