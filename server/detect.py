"""Which language a text is in: lingua (offline, its models ship in the wheel), among the server's languages.

The candidates are the languages the served models read or write that lingua knows, plus the
``detect_languages`` setting's rivals (ISO 639-1 codes). Weighing the served target languages and
the rivals is what lets a text in a language no model reads be recognised as such and refused,
instead of being translated as the nearest served source language. Languages lingua does not
know (the synthetic ``xx``/``yy`` pair, say) are never candidates: a server none of whose source
languages lingua knows cannot detect, and says so.

Confidence is lingua's, relative to the other candidates and scaled to 0-100 as LibreTranslate
reports it. Each candidate's model is loaded when the detector is built (lingua's high-accuracy
models; measured: 296 MB of memory for eight European languages), so no request pays for loading.

Candidates alone cannot refuse a language nobody listed: French on a German -> English server is
"most likely German". So a **screen** weighs every language lingua knows, with its low-accuracy
models (all 75 languages: +75 MB, about 4 s to load on 2 busy cores, against 1.3 GB and 55 s for
the high-accuracy ones): a text of ``SCREEN_MIN_WORDS`` words or more to which the screen gives the
candidates together less than ``screen_share`` is refused, naming the language the screen saw.
Shorter texts are left to the candidates, since one or two words are ambiguous across languages
(the screen takes German "Hund" for Danish, English "Hello world" for Vietnamese).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from lingua import IsoCode639_1, Language, LanguageDetectorBuilder

SCREEN_MIN_WORDS = 3


class DetectionError(ValueError):
    """Detection cannot answer (no language to detect) or found a language no served model reads."""


@dataclass(frozen=True)
class Detection:
    language: str  # ISO 639-1 code, as /languages names it
    confidence: float  # 0-100, relative to the other candidates

    def as_json(self) -> dict[str, object]:
        return {"confidence": self.confidence, "language": self.language}


def lingua_language(code: str) -> Language | None:
    """lingua's Language for an ISO 639-1 code, or None for a code it does not know."""
    iso = getattr(IsoCode639_1, code.strip().upper(), None) if code.strip().isalpha() else None
    return Language.from_iso_code_639_1(iso) if isinstance(iso, IsoCode639_1) else None


class LanguageDetector:
    """Detects among ``candidates``; answers for translation only in one of ``sources``."""

    def __init__(self, sources: Iterable[str], targets: Iterable[str], rivals: Iterable[str] = (),
                 screen_share: float = 0.0):
        self.sources = sorted(set(sources))
        served = set(self.sources) | set(targets)
        known = {code: lingua_language(code) for code in served | set(rivals)}  # ServeSettings checks rivals
        self.candidates = sorted(code for code, language in known.items() if language is not None)
        self.undetectable = sorted(code for code in served if known[code] is None)
        self._codes = {known[code]: code for code in self.candidates}
        detectable_sources = set(self.sources) & set(self.candidates)
        if not detectable_sources:
            self._why_not = (f"language detection is not available: lingua knows none of the served source "
                             f"languages ({', '.join(self.sources) or 'none'}); give source explicitly")
        elif len(self.candidates) < 2:
            self._why_not = (f"language detection needs at least two languages to choose from, and only "
                             f"{self.candidates[0]} is served; add rivals with detect_languages "
                             f"(WDSERVE_DETECT_LANGUAGES), or give source explicitly")
        else:
            self._why_not = ""
        self._detector = (LanguageDetectorBuilder.from_languages(*self._codes)
                          .with_preloaded_language_models().build() if not self._why_not else None)
        self.screen_share = screen_share
        self._screen = (LanguageDetectorBuilder.from_all_languages().with_low_accuracy_mode()
                        .with_preloaded_language_models().build()
                        if self._detector is not None and screen_share > 0 else None)

    @property
    def available(self) -> bool:
        return self._detector is not None

    def detect(self, text: str) -> list[Detection]:
        """Every candidate with its confidence, most likely first (raises DetectionError if unavailable).

        Blocking (about 1 ms for a sentence, 8 ms for 5,000 characters): run it off the event loop.
        """
        if self._detector is None:
            raise DetectionError(self._why_not)
        values = self._detector.compute_language_confidence_values(text)
        return [Detection(self._codes[value.language], round(value.value * 100, 2)) for value in values]

    def detect_source(self, text: str) -> Detection:
        """The most likely language, when a served model reads it; DetectionError naming it otherwise."""
        best = self.detect(text)[0]
        self._screen_out(text)  # first: Russian, say, is no candidate at all (confidence 0) but has a name
        if best.confidence == 0:
            raise DetectionError("cannot tell which language the text is in (it has no words lingua "
                                 "recognises); give source explicitly")
        if best.language not in self.sources:
            raise DetectionError(f"the text looks like {best.language} (confidence {best.confidence:g}), "
                                 f"which no served model translates from; served source languages: "
                                 f"{', '.join(self.sources)}")
        return best

    def _screen_out(self, text: str) -> None:
        """DetectionError when every language weighed makes the text clearly none of the candidates."""
        if self._screen is None or len(text.split()) < SCREEN_MIN_WORDS:
            return
        values = self._screen.compute_language_confidence_values(text)
        share = sum(value.value for value in values if value.language in self._codes)
        if share < self.screen_share:
            seen = values[0].language
            raise DetectionError(
                f"the text looks like {seen.iso_code_639_1.name.lower()} ({seen.name.title()}, confidence "
                f"{round(values[0].value * 100, 2):g} among every language detection knows), which no "
                f"served model translates from; served source languages: {', '.join(self.sources)}")
