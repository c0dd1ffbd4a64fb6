"""Per-sentence output limits on a real CTranslate2 model: the rule the pipeline's evaluation uses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from wdserve.artifacts import OutputLimit, translate_bounded
from wdserve.server.models import ModelRegistry
from wdserve.server.settings import ServeSettings


class CountingTranslator:
    """The real translator, with its translate_batch calls recorded."""

    def __init__(self, translator: Any) -> None:
        self.translator = translator
        self.calls: list[tuple[int, int]] = []  # (sentences, max_decoding_length)

    def translate_batch(self, batch: list[list[str]], **options: Any) -> Any:
        self.calls.append((len(batch), options["max_decoding_length"]))
        return self.translator.translate_batch(batch, **options)


@pytest.fixture
def short_and_long(tiny_workdir: Path, registry: ModelRegistry) -> list[list[str]]:
    model = registry.resolve("teacher-float32")
    sources = (tiny_workdir / "data" / "test.src").read_text(encoding="utf-8").splitlines()
    pieces = sorted((model.encode(s) for s in sources), key=len)
    assert len(pieces[-1]) >= 3 * len(pieces[0])
    return [pieces[-1], pieces[0]]


def test_limit_follows_the_source_length_and_max_length() -> None:
    limit = OutputLimit(ratio=1.5, margin=10)
    assert limit.tokens(4, max_length=256) == 17  # 1.5 x (4 + </s>) + 10, as distill.decode
    assert limit.tokens(400, max_length=256) == 256
    assert OutputLimit(ratio=0, margin=0).tokens(5, max_length=8) == 1
    assert ServeSettings().output_length_ratio == OutputLimit().ratio


def test_each_sentence_gets_its_own_limit(registry: ModelRegistry, short_and_long: list[list[str]]) -> None:
    model = registry.resolve("teacher-float32")
    limit = OutputLimit(ratio=0.5, margin=1)  # well under what the model writes: every output hits it
    limits = [limit.tokens(len(pieces), 64) for pieces in short_and_long]
    spy = CountingTranslator(model.translator)

    outputs = translate_bounded(spy, short_and_long, beam_size=2, max_length=64, limit=limit)

    assert [len(output) <= own for output, own in zip(outputs, limits, strict=True)] == [True, True]
    # One call under the longest limit, then the short sentence again under its own.
    assert spy.calls == [(2, max(limits)), (1, limits[1])]
    alone = model.translator.translate_batch([short_and_long[1]], beam_size=2, max_decoding_length=limits[1])
    assert outputs[1] == alone[0].hypotheses[0]


def test_a_loose_limit_is_one_plain_call(registry: ModelRegistry, short_and_long: list[list[str]]) -> None:
    model = registry.resolve("teacher-float32")
    spy = CountingTranslator(model.translator)

    outputs = translate_bounded(spy, short_and_long, beam_size=2, max_length=24, limit=OutputLimit(100, 0))

    plain = model.translator.translate_batch(short_and_long, beam_size=2, max_decoding_length=24)
    assert outputs == [result.hypotheses[0] for result in plain]
    assert spy.calls == [(2, 24)]
    assert translate_bounded(spy, [], beam_size=2, max_length=24, limit=OutputLimit()) == []
