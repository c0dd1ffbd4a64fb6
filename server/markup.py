"""HTML in, HTML out: the text nodes are translated and everything else stays where it was, byte for byte.

Python's own ``html.parser`` (the tokenizer BeautifulSoup's ``html.parser`` mode runs on, lenient
with broken markup: unclosed tags, stray ``<``, unterminated comments) cuts the document into
tokens. Each token's exact source span is kept, so whatever is not translated is copied from the
input unchanged: tags with their attributes and quoting, comments, the doctype, entities, and
the whitespace around each text node. Rendering the untranslated texts gives back input without
character references or a bare ``<``/``>`` in its text exactly, and any input with the same meaning
(a property test checks both).

What is translated: each run of text between two tags, with its entities decoded for the model
(``Tom &amp; Jerry`` is read as ``Tom & Jerry``) and ``&``, ``<``, ``>`` escaped again in the
translation. What is not: attribute values (``alt``, ``title``), text without a letter, and
everything inside ``script``, ``style``, ``code``, ``pre``, ``kbd``, ``samp``, ``textarea`` and
``template``, or inside an element marked ``translate="no"`` (HTML's own attribute) or with the
class ``notranslate``. Inline markup splits a sentence (``<p>a <b>big</b> dog</p>`` is three
texts), as in LibreTranslate's HTML mode.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from html.parser import HTMLParser

SKIPPED_ELEMENTS = frozenset({"script", "style", "code", "pre", "kbd", "samp", "textarea", "template"})
VOID_ELEMENTS = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
                           "param", "source", "track", "wbr"})


class MarkupError(ValueError):
    """HTML the parser cannot read; the message says where."""


@dataclass(frozen=True)
class TextNode:
    """A run of text to translate: ``text`` is decoded and stripped; ``leading`` and ``trailing`` are the
    source's whitespace around it (entities such as ``&nbsp;`` included), kept as they were."""

    leading: str
    text: str
    trailing: str


@dataclass(frozen=True)
class HtmlDocument:
    """The input as verbatim chunks and text nodes, in order."""

    parts: tuple[str | TextNode, ...]

    @property
    def texts(self) -> list[str]:
        """What to translate, one entry per text node."""
        return [part.text for part in self.parts if isinstance(part, TextNode)]

    def render(self, translations: list[str]) -> str:
        """The document with each text node replaced by its translation, escaped for HTML."""
        nodes = [part for part in self.parts if isinstance(part, TextNode)]
        if len(translations) != len(nodes):
            raise ValueError(f"{len(translations)} translations for {len(nodes)} text nodes")
        outputs = iter(translations)
        return "".join(part if isinstance(part, str) else
                       f"{part.leading}{html.escape(next(outputs), quote=False)}{part.trailing}"
                       for part in self.parts)

    @classmethod
    def parse(cls, source: str) -> HtmlDocument:
        """Raises MarkupError for the few inputs ``html.parser`` gives up on (``<![foo[``)."""
        tokens = _Tokenizer()
        try:
            tokens.feed(source)
            tokens.close()
        except (AssertionError, ValueError) as err:  # html.parser's way of refusing a construct
            line, column = tokens.getpos()
            raise MarkupError(f"HTML the parser cannot read at line {line}, column {column + 1}: "
                              f"{err}") from err
        return cls(tuple(_parts(source, tokens.events)))


@dataclass
class _Event:
    start: int  # offset of the token's first character in the source
    text: str | None = None  # decoded text of a data token; None for markup
    translatable: bool = False


class _Tokenizer(HTMLParser):
    """Records where each token starts, and whether its text is to be translated."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.events: list[_Event] = []
        self._line_starts = [0]
        self._fed = 0
        self._open: list[tuple[str, bool]] = []  # (tag, text inside is kept) of the open elements

    def feed(self, data: str) -> None:
        self._line_starts += [self._fed + i + 1 for i, char in enumerate(data) if char == "\n"]
        self._fed += len(data)
        super().feed(data)

    def _offset(self) -> int:
        line, column = self.getpos()  # the current token's start; html.parser counts "\n" only, as we do
        return self._line_starts[line - 1] + column

    def _markup(self) -> None:
        self.events.append(_Event(self._offset()))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._markup()
        if tag in VOID_ELEMENTS:
            return
        values = dict(attrs)
        kept = (tag in SKIPPED_ELEMENTS or (values.get("translate") or "").strip().lower() == "no"
                or "notranslate" in (values.get("class") or "").split())
        self._open.append((tag, kept or bool(self._open and self._open[-1][1])))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._markup()

    def handle_endtag(self, tag: str) -> None:
        self._markup()
        # an end tag closes its element and any left open inside it; a stray end tag changes nothing
        for depth in range(len(self._open) - 1, -1, -1):
            if self._open[depth][0] == tag:
                del self._open[depth:]
                break

    def handle_data(self, data: str) -> None:
        kept = bool(self._open and self._open[-1][1]) or self.cdata_elem is not None
        self.events.append(_Event(self._offset(), data, not kept))

    def handle_comment(self, data: str) -> None:
        self._markup()

    def handle_decl(self, decl: str) -> None:
        self._markup()

    def handle_pi(self, data: str) -> None:
        self._markup()

    def unknown_decl(self, data: str) -> None:
        self._markup()


def _parts(source: str, events: list[_Event]) -> list[str | TextNode]:
    """Verbatim chunks and text nodes; consecutive data tokens (``a < b`` is three) make one node."""
    starts = [event.start for event in events] + [len(source)]
    parts: list[str | TextNode] = []
    run: list[tuple[str, str]] = []  # (raw, decoded) of the data tokens in a row

    def end_run() -> None:
        if not run:
            return
        raw = "".join(r for r, _ in run)
        decoded = "".join(d for _, d in run)
        core = decoded.strip()
        # a run whose decoded text is not exactly its source span (a token the parser dropped inside it)
        # or that has no letter is copied as it is
        if any(char.isalpha() for char in core) and html.unescape(raw) == decoded:
            leading = decoded[: len(decoded) - len(decoded.lstrip())]
            trailing = decoded[len(decoded.rstrip()):]
            parts.append(_text_node(raw, leading, core, trailing))
        else:
            parts.append(raw)
        run.clear()

    for event, end in zip(events, starts[1:], strict=True):
        raw = source[event.start:end]
        if event.text is not None and event.translatable:
            run.append((raw, event.text))
            continue
        end_run()
        parts.append(raw)
    end_run()
    if starts[0] > 0:  # nothing the parser reported before its first token: keep it as it is
        parts.insert(0, source[: starts[0]])
    return parts


# one character of text, or one character reference (html.unescape's forms), for _text_node
_CHARACTER = re.compile(r"&(?:#[0-9]+|#[xX][0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]*);?|.", re.DOTALL)


def _text_node(raw: str, leading: str, core: str, trailing: str) -> TextNode:
    """The node with its surrounding whitespace as written in ``raw`` (``&nbsp;`` stays an entity).

    ``raw`` is cut into characters and character references (linear time, whatever the
    whitespace); the blank ones at each end are the node's edges. The cut is checked by decoding
    each part; where it does not reproduce the decoded text, the decoded whitespace is kept instead.
    """
    tokens = [match.group() for match in _CHARACTER.finditer(raw)]
    blank = [not html.unescape(token).strip() for token in tokens]
    head = next(i for i, is_blank in enumerate(blank) if not is_blank)
    tail = next(i for i, is_blank in enumerate(reversed(blank)) if not is_blank)
    start = sum(len(token) for token in tokens[:head])
    end = len(raw) - sum(len(token) for token in tokens[len(tokens) - tail:])
    if (html.unescape(raw[:start]), html.unescape(raw[start:end]), html.unescape(raw[end:])) != (
            leading, core, trailing):
        return TextNode(leading, core, trailing)
    return TextNode(raw[:start], core, raw[end:])
