"""sacreBLEU scoring of text, checkpoints and CTranslate2 directories."""

import shutil

import pytest

from wdserve.artifacts import ArtifactError
from wdserve.distill.checkpoint import load_model
from wdserve.distill.decode import translate
from wdserve.distill.evaluate import evaluate_checkpoint, evaluate_ctranslate2, score

REFERENCES = [
    "a small dog runs across the green field",
    "two women are sitting on a bench near the river",
    "the man in the red shirt is reading a book",
]


def test_identical_text_scores_100_with_real_signatures():
    result = score(REFERENCES, REFERENCES)
    assert result["bleu"] == 100.0 and result["chrf"] == 100.0
    assert result["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert result["chrf_signature"].startswith("nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:")


def test_unrelated_text_scores_low_and_partial_overlap_in_between():
    garbage = score(["zzz qqq", "xx yy zz", "q"], REFERENCES)
    assert garbage["bleu"] < 1 and garbage["chrf"] < 10
    partial = score(["a small dog runs across the field", "two women sit near a river",
                     "a man is reading"], REFERENCES)
    assert 10 < partial["bleu"] < 100 and garbage["chrf"] < partial["chrf"] < 100


def test_hypotheses_and_references_must_pair_up():
    with pytest.raises(ValueError, match="2 hypotheses but 3 references"):
        score(REFERENCES[:2], REFERENCES)
    with pytest.raises(ValueError, match="no references"):
        score([], [])


def test_evaluate_checkpoint_scores_the_model_translations(tiny_workdir):
    checkpoint = tiny_workdir / "models" / "teacher" / "checkpoint_best.pt"
    src, ref = tiny_workdir / "data" / "test.src", tiny_workdir / "data" / "test.tgt"
    result = evaluate_checkpoint(checkpoint, src, ref, beam_size=2)
    model, vocab, _ = load_model(checkpoint)
    sources = src.read_text(encoding="utf-8").splitlines()
    references = ref.read_text(encoding="utf-8").splitlines()
    assert result["hypotheses"] == translate(model, vocab, sources, beam_size=2)
    assert result["bleu"] == score(result["hypotheses"], references)["bleu"]
    assert result["sentences"] == len(sources) and result["beam_size"] == 2


def test_evaluate_ctranslate2_reads_an_exported_directory(tiny_workdir, tmp_path):
    src, ref = tiny_workdir / "data" / "test.src", tiny_workdir / "data" / "test.tgt"
    exported = tiny_workdir / "export" / "teacher-float32"
    result = evaluate_ctranslate2(exported, src, ref, beam_size=1)
    references = ref.read_text(encoding="utf-8").splitlines()
    assert len(result["hypotheses"]) == len(references)
    assert result["chrf"] == score(result["hypotheses"], references)["chrf"]
    # The same model in PyTorch, with the same per-sentence output limit (the one the server applies).
    model, vocab, _ = load_model(tiny_workdir / "models" / "teacher" / "checkpoint_best.pt")
    sources = src.read_text(encoding="utf-8").splitlines()[:8]
    assert result["hypotheses"][:8] == translate(model, vocab, sources, beam_size=1)

    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    (broken / "sentencepiece.model").unlink()
    with pytest.raises(ArtifactError, match=r"broken is not an exported model: sentencepiece"):
        evaluate_ctranslate2(broken, src, ref)
