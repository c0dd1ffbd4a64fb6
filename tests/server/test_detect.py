"""server.detect: lingua among the served languages, with real German, English and French text."""

from __future__ import annotations

import pytest
from lingua import Language, LanguageDetectorBuilder
from pydantic import ValidationError

from wdserve.server.detect import DetectionError, LanguageDetector
from wdserve.server.settings import ServeSettings

GERMAN = "Ein Mann fährt mit dem Fahrrad über die Brücke, und die Sonne scheint."
ENGLISH = "A man rides his bicycle across the bridge while the sun is shining."
FRENCH = "Un homme traverse le pont à vélo pendant que le soleil brille."


@pytest.fixture(scope="module")
def de_en_with_french_rival() -> LanguageDetector:
    return LanguageDetector(sources=["de"], targets=["en"], rivals=["fr"])


def test_a_served_source_language_is_detected_with_lingua_s_own_confidence(
        de_en_with_french_rival: LanguageDetector) -> None:
    detections = de_en_with_french_rival.detect(GERMAN)
    assert [d.language for d in detections][0] == "de"
    assert sorted(d.language for d in detections) == ["de", "en", "fr"]
    assert sum(d.confidence for d in detections) == pytest.approx(100, abs=0.05)
    languages = (Language.GERMAN, Language.ENGLISH, Language.FRENCH)
    lingua = LanguageDetectorBuilder.from_languages(*languages).build()
    first = lingua.compute_language_confidence_values(GERMAN)[0]
    assert first.language == Language.GERMAN and detections[0].confidence == round(100 * first.value, 2)
    assert de_en_with_french_rival.detect_source(GERMAN) == detections[0]
    # a short, ambiguous text gets an honest, lower confidence: nothing is fixed at 100
    assert 0 < de_en_with_french_rival.detect("Hallo")[0].confidence < 100


def test_a_target_language_or_a_rival_is_named_and_refused(de_en_with_french_rival: LanguageDetector) -> None:
    with pytest.raises(DetectionError, match="looks like en .*served source languages: de"):
        de_en_with_french_rival.detect_source(ENGLISH)
    with pytest.raises(DetectionError, match="looks like fr"):
        de_en_with_french_rival.detect_source(FRENCH)
    with pytest.raises(DetectionError, match="cannot tell"):
        de_en_with_french_rival.detect_source("1234 56")


def test_languages_lingua_does_not_know_are_never_candidates() -> None:
    synthetic = LanguageDetector(sources=["xx"], targets=["yy"])
    assert not synthetic.available and synthetic.undetectable == ["xx", "yy"]
    with pytest.raises(DetectionError, match="lingua knows none of the served source languages .xx."):
        synthetic.detect(GERMAN)
    mixed = LanguageDetector(sources=["xx", "de"], targets=["yy", "en"])
    assert mixed.available and mixed.candidates == ["de", "en"] and mixed.undetectable == ["xx", "yy"]
    alone = LanguageDetector(sources=["de"], targets=["yy"])
    with pytest.raises(DetectionError, match="at least two languages"):
        alone.detect(GERMAN)


def test_the_rivals_setting_takes_codes_lingua_knows() -> None:
    assert ServeSettings(detect_languages=" FR, es").detect_languages == ["fr", "es"]
    with pytest.raises(ValidationError, match="does not know zz"):
        ServeSettings(detect_languages="fr,zz")


@pytest.fixture(scope="module")
def de_en_screened() -> LanguageDetector:
    return LanguageDetector(sources=["de"], targets=["en"], screen_share=0.05)


@pytest.mark.parametrize("text", [FRENCH, "Un perro corre en el parque.", "Due cani giocano nella neve.",
                                  "Twee honden spelen in de sneeuw.", "Два человека идут по улице."])
def test_the_screen_refuses_a_language_nobody_listed(de_en_screened: LanguageDetector, text: str) -> None:
    unscreened = LanguageDetector(sources=["de"], targets=["en"])
    with pytest.raises(DetectionError, match="looks like (?!de|en).*among every language"):
        de_en_screened.detect_source(text)
    # without the screen the text is taken for a candidate (or for nothing): the reason the screen exists
    try:
        answer = unscreened.detect_source(text).language
    except DetectionError as err:
        answer = str(err)
    assert answer == "de" or "looks like en" in answer or "cannot tell" in answer


@pytest.mark.parametrize("text", [GERMAN, "Das ist gut.", "Zwei Hunde spielen im Schnee.", "Hund"])
def test_the_screen_lets_the_served_language_through(de_en_screened: LanguageDetector, text: str) -> None:
    # "Hund" alone the screen takes for Danish: under three words the candidates decide
    assert de_en_screened.detect_source(text).language == "de"
