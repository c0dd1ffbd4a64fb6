"""server.markup: which text of an HTML document is translated; everything else comes back as it was."""

from __future__ import annotations

import html

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wdserve.server.markup import HtmlDocument, MarkupError


def translated(source: str) -> str:
    """The document with every text node upper-cased and marked, as a stand-in translation."""
    document = HtmlDocument.parse(source)
    return document.render([f"[{text.upper()}]" for text in document.texts])


def test_text_nodes_are_translated_and_markup_stays_where_it_was() -> None:
    source = ('<!DOCTYPE html>\n<p class="intro" data-x=\'1\'>Hello <b>big</b> world.</p>'
              '<!-- a comment --><img src="a.png" alt="a dog"><br/>\n<p>Bye</p>')
    assert HtmlDocument.parse(source).texts == ["Hello", "big", "world.", "Bye"]
    assert translated(source) == ('<!DOCTYPE html>\n<p class="intro" data-x=\'1\'>[HELLO] <b>[BIG]</b> '
                                  '[WORLD.]</p><!-- a comment --><img src="a.png" alt="a dog"><br/>\n'
                                  '<p>[BYE]</p>')


def test_entities_are_decoded_for_the_model_and_escaped_again_and_kept_around_the_text() -> None:
    source = "<p>&nbsp;Tom &amp; Jerry&#160;</p><p>a &lt; b</p><p>&copy;</p>"
    document = HtmlDocument.parse(source)
    assert document.texts == ["Tom & Jerry", "a < b"]  # "&copy;" alone has no letter: not translated
    assert document.render(["T & J", "x < y"]) == "<p>&nbsp;T &amp; J&#160;</p><p>x &lt; y</p><p>&copy;</p>"


def test_code_scripts_and_translate_no_are_kept() -> None:
    source = ('<p>Run <code>ls -la</code> now.</p><pre>keep\n me</pre><script>if (a < b) alert("hi")</script>'
              '<style>p { color: red }</style><div translate="no">Brand <b>Name</b></div>'
              '<span class="x notranslate">Keep</span><p>Go</p>')
    assert translated(source) == source.replace("Run ", "[RUN] ").replace("now.", "[NOW.]").replace(
        "<p>Go</p>", "<p>[GO]</p>")


def test_malformed_html_is_read_as_browsers_would_roughly_and_never_loses_markup() -> None:
    assert translated("<p>unclosed <b>bold") == "<p>[UNCLOSED] <b>[BOLD]"
    assert translated("</div>stray end</p> text") == "</div>[STRAY END]</p> [TEXT]"
    assert translated("a < b") == "[A < B]".replace("<", "&lt;")
    # an element left open inside a kept one ends with it
    assert translated("<code><b>x</code> y") == "<code><b>x</code> [Y]"


def test_html_the_parser_gives_up_on_is_a_markup_error_naming_the_place() -> None:
    with pytest.raises(MarkupError, match="line 2, column 1"):
        HtmlDocument.parse("<p>fine</p>\n<![foo[ y ]]>")


def test_render_needs_one_translation_per_text_node() -> None:
    with pytest.raises(ValueError, match="1 translations for 2 text nodes"):
        HtmlDocument.parse("<p>a</p><p>b</p>").render(["x"])


HTML_PIECES = st.sampled_from([
    "<p>", "</p>", "<b>", "</b>", "<br>", "<br/>", "<img alt='x &amp; y'>", "<code>", "</code>",
    "<script>", "</script>", '<div translate="no">', "</div>", "<!-- c -->", "<!--", "<!DOCTYPE html>",
    "&amp;", "&nbsp;", "&#160;", "&lt;", "&bogus;", "&", "<", ">", " ", "\n", "\t", "hello", "Welt", "AT&T",
    "<![CDATA[x]]>", "<?pi?>", "</", "<p", "=",
])


@settings(max_examples=300, deadline=None)
@given(st.lists(HTML_PIECES, max_size=30).map("".join))
def test_any_markup_comes_back_unchanged_around_the_texts(source: str) -> None:
    try:
        document = HtmlDocument.parse(source)
    except MarkupError:
        return  # refused cleanly, never another exception
    # untranslated, the document means what it meant; it is the same text unless a text node held a
    # character reference (decoded for the model) or a bare & < > (escaped in the output)
    rendered = document.render(document.texts)
    if "&" not in source and not any(char in text for text in document.texts for char in "<>"):
        assert rendered == source
    assert html.unescape(rendered) == html.unescape(source)
    assert HtmlDocument.parse(rendered).texts == document.texts
