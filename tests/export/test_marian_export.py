"""An imported Marian teacher, and a student generated from it, from export to serving.

The outside oracle is CTranslate2's own converter (``TransformersConverter``) run on the same Hugging
Face model (``tiny_opus_marian``: its ``<pad>`` row is zero, as in OPUS-MT models, because CTranslate2
starts Marian's decoder from a zero embedding). wdserve's export of the imported teacher has one token
more (``<pad>``, suppressed) and another token order, so equal outputs are not equal files: they are the
same model. Everything downstream of an export (``wdserve export --verify``, ``wdserve evaluate``,
sequence-level KD, the server, the bench's direct baseline) reads the export's two SentencePiece models.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

transformers = pytest.importorskip("transformers")

import ctranslate2  # noqa: E402
import torch  # noqa: E402

from wdserve.artifacts import (  # noqa: E402
    EXPORT_INFO,
    EXPORT_SOURCE_VOCAB,
    EXPORT_TARGET_VOCAB,
    EXPORT_VOCAB,
    ArtifactError,
    ExportDir,
)
from wdserve.cli import main  # noqa: E402
from wdserve.distill.checkpoint import file_sha256, load_model, save_checkpoint  # noqa: E402
from wdserve.distill.marian import import_marian  # noqa: E402
from wdserve.distill.seqkd import cache_info_path, generate_seqkd_targets  # noqa: E402
from wdserve.distill.students import student_config  # noqa: E402
from wdserve.distill.wd import WeightGenerator  # noqa: E402
from wdserve.export.verify import verify_export  # noqa: E402
from wdserve.loadtest.baselines import DirectTranslator  # noqa: E402
from wdserve.pieces import Tokenizer  # noqa: E402
from wdserve.server.models import ModelRegistry  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Recommended. pip install sacremoses")

LANGUAGE_CODE = ">>yy<<"  # in the tiny model's vocab.json (tests/conftest.py TINY_MARIAN_LANGUAGE_CODE)
MAX_DECODING_LENGTH = 40


@pytest.fixture(scope="module")
def marian(tiny_opus_marian, tmp_path_factory) -> SimpleNamespace:
    """The Hugging Face model, wdserve's float32 and int8 exports of its import (by `wdserve export
    --verify`, whose report is kept), CTranslate2's own conversion, and test sentences."""
    root = tmp_path_factory.mktemp("marian_exports")
    pairs = tiny_opus_marian.pairs
    sources = [source for source, _ in pairs[260:276]] + [f"{LANGUAGE_CODE} {pairs[280][0]}"]
    references = [target for _, target in pairs[260:276]] + [pairs[280][1]]
    (root / "test.src").write_text("".join(f"{s}\n" for s in sources), encoding="utf-8")
    (root / "test.tgt").write_text("".join(f"{r}\n" for r in references), encoding="utf-8")

    checkpoint = import_marian(tiny_opus_marian.root, root / "teacher", local_files_only=True)
    report = root / "verify.json"
    assert main(["export", str(checkpoint), str(root / "export"), "-q", "float32", "int8",
                 "--verify", "--verify-src", str(root / "test.src"), "--report", str(report)]) == 0

    oracle = root / "oracle"
    converter = ctranslate2.converters.TransformersConverter(
        str(tiny_opus_marian.root), copy_files=[EXPORT_SOURCE_VOCAB, EXPORT_TARGET_VOCAB])
    converter.convert(str(oracle))
    return SimpleNamespace(hf=tiny_opus_marian, root=root, checkpoint=checkpoint, sources=sources,
                           src=root / "test.src", ref=root / "test.tgt",
                           verify=json.loads(report.read_text()),
                           ours=root / "export" / "teacher-float32", int8=root / "export" / "teacher-int8",
                           oracle=oracle)


@pytest.fixture(scope="module")
def registry(marian) -> Iterator[ModelRegistry]:
    """``wdserve serve --model wdserve=<wdserve's export> --model oracle=<CTranslate2's conversion>``."""
    loaded = ModelRegistry.load({"wdserve": marian.ours, "oracle": marian.oracle})
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def served(marian, registry) -> dict[str, list[str]]:
    """Beam-4 text of the test sentences as the server returns it, for each served directory."""
    texts = {}
    for name, model in registry.models.items():
        pieces = [model.encode(text) for text in marian.sources]
        texts[name] = [output.text for output in model.translate_texts(pieces, beam_size=4, max_length=256)]
    return texts


def test_export_holds_marians_two_sentencepiece_models_and_names_them(marian, tmp_path):
    info = json.loads((marian.ours / EXPORT_INFO).read_text())
    assert (info["source_vocab"], info["target_vocab"]) == (EXPORT_SOURCE_VOCAB, EXPORT_TARGET_VOCAB)
    assert not (marian.ours / EXPORT_VOCAB).exists()
    export = ExportDir.read(marian.ours)
    for ours, theirs in ((export.source_vocab, "source.spm"), (export.target_vocab, "target.spm")):
        assert ours.read_bytes() == (marian.hf.root / theirs).read_bytes()
    # CTranslate2's own directory has no model.json: Marian's file names are found by themselves ...
    oracle = ExportDir.read(marian.oracle, require_info=False)
    assert (oracle.source_vocab.name, oracle.target_vocab.name) == (EXPORT_SOURCE_VOCAB, EXPORT_TARGET_VOCAB)
    # ... and a file model.json names must be there.
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in marian.ours.iterdir():
        if path.name != EXPORT_TARGET_VOCAB:
            (broken / path.name).write_bytes(path.read_bytes())
    with pytest.raises(ArtifactError, match="not an exported model: target.spm is missing"):
        ExportDir.read(broken)


@pytest.mark.parametrize("beam_size", [1, 4])
def test_export_translates_token_identically_to_ctranslate2s_own_converter(marian, beam_size):
    ours_tokenizer = Tokenizer.for_export(ExportDir.read(marian.ours))
    oracle_tokenizer = Tokenizer.for_export(ExportDir.read(marian.oracle, require_info=False))
    # CTranslate2's Marian conversion leaves the source's </s> to the caller; wdserve's appends it.
    assert (ours_tokenizer.source_end, oracle_tokenizer.source_end) == ((), ("</s>",))
    pieces = [ours_tokenizer.source_pieces(text) for text in marian.sources]
    assert pieces == [oracle_tokenizer.source_pieces(text) for text in marian.sources]
    assert pieces[-1][0] == LANGUAGE_CODE  # a language code stays one piece

    def translate(model_dir: Path, end: tuple[str, ...]):
        return ctranslate2.Translator(str(model_dir)).translate_batch(
            [p + list(end) for p in pieces], beam_size=beam_size, max_decoding_length=MAX_DECODING_LENGTH,
            return_scores=True)

    ours = translate(marian.ours, ours_tokenizer.source_end)
    theirs = translate(marian.oracle, oracle_tokenizer.source_end)
    assert [r.hypotheses[0] for r in ours] == [r.hypotheses[0] for r in theirs]
    assert [r.scores[0] for r in ours] == pytest.approx([r.scores[0] for r in theirs], abs=1e-4)
    outputs = [r.hypotheses[0] for r in ours]
    assert len({tuple(o) for o in outputs}) > len(outputs) // 2  # the sentences get different outputs
    assert sum(len(o) < MAX_DECODING_LENGTH for o in outputs) >= len(outputs) // 2  # most end in </s>
    assert not {"<pad>", "<s>"} & {token for output in outputs for token in output}


def test_server_serves_both_directories_with_the_same_text(marian, registry, served):
    assert served["wdserve"] == served["oracle"]
    assert all(served["wdserve"]) and len(set(served["wdserve"])) > 1
    # pieces the target model lacks (a language code, source-only pieces) are written as MarianTokenizer
    # writes them, not as the target SentencePiece model alone would
    tokenizer = registry.models["wdserve"].tokenizer
    pieces = registry.models["wdserve"].encode(marian.sources[-1])
    assert any(tokenizer.target_sp.piece_to_id(p) == tokenizer.target_sp.unk_id() for p in pieces[1:])
    assert tokenizer.decode(pieces) == marian.hf.tokenizer.convert_tokens_to_string(pieces)
    # the text is MarianTokenizer's for the same tokens
    oracle = ctranslate2.Translator(str(marian.oracle))
    pieces = [Tokenizer.for_export(ExportDir.read(marian.ours)).source_pieces(s) + ["</s>"]
              for s in marian.sources[:4]]
    tokens = [r.hypotheses[0] for r in oracle.translate_batch(pieces, beam_size=4, max_decoding_length=256)]
    assert [marian.hf.tokenizer.convert_tokens_to_string(t) for t in tokens] == served["wdserve"][:4]


def test_export_verify_and_wdserve_evaluate_pass_on_the_exported_teacher(marian, served, tmp_path, capsys):
    assert marian.verify["float32_parity"] is True
    float32 = marian.verify["variants"]["float32"]
    assert float32["identical_sentences"] == len(marian.sources) and float32["max_logprob_diff"] < 1e-4
    assert marian.verify["variants"]["int8"]["status"] == "ok"
    hypotheses = tmp_path / "hypotheses.txt"
    assert main(["evaluate", str(marian.ours), "--src", str(marian.src), "--ref", str(marian.ref),
                 "--beam-size", "4", "--output", str(hypotheses)]) == 0
    assert "BLEU" in capsys.readouterr().out
    assert hypotheses.read_text(encoding="utf-8").splitlines() == served["wdserve"]


def test_seqkd_and_the_bench_baseline_translate_as_the_server_does(marian, served, tmp_path):
    out = tmp_path / "train.tgt"
    targets = generate_seqkd_targets(marian.checkpoint, marian.sources, out, beam_size=4,
                                     ct2_model_dir=marian.ours)
    assert json.loads(cache_info_path(out).read_text())["generator"] == "ctranslate2"
    assert targets == served["wdserve"]
    for export in (ExportDir.read(marian.ours), ExportDir.read(marian.oracle, require_info=False)):
        direct = DirectTranslator(export, threads=1)
        assert direct.translate(marian.sources, beam_size=4, max_length=256, batch_size=8) == served["oracle"]


def test_a_student_generated_from_the_teacher_exports_verifies_and_serves(marian, tmp_path):
    teacher, vocab, state = load_model(marian.checkpoint)
    torch.manual_seed(0)
    student = WeightGenerator(teacher, student_config(teacher.config, "stu1")).fold().eval()
    checkpoint = tmp_path / "stu1" / "checkpoint_best.pt"
    save_checkpoint(checkpoint, student, vocab, {**state["meta"], "name": "stu1", "method": "wd",
                                                 "teacher_sha256": file_sha256(marian.checkpoint)})
    assert main(["export", str(checkpoint), str(tmp_path / "export"), "-q", "float32"]) == 0
    report = verify_export(checkpoint, {"float32": tmp_path / "export"}, marian.sources)
    assert report["float32_parity"] is True
    registry = ModelRegistry.load({"stu1": tmp_path / "export"})
    try:
        model = registry.models["stu1"]
        pieces = [model.encode(text) for text in marian.sources]
        outputs = model.translate_pieces(pieces, beam_size=4, max_length=256)
        assert not {"<pad>", "<s>"} & {token for output in outputs for token in output}
        assert all(output.text for output in model.translate_texts(pieces, beam_size=1, max_length=256))
    finally:
        registry.close()
