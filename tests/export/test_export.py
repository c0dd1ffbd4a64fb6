"""Checkpoint -> CTranslate2 conversion: parity with PyTorch for every supported shape,
quantized variants, metadata, refusals, verification and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import ctranslate2
import numpy as np
import pytest
import torch

from wdserve.cli import main
from wdserve.distill.batching import pad_ids
from wdserve.distill.checkpoint import file_sha256, read_checkpoint, save_checkpoint
from wdserve.distill.decode import greedy_search
from wdserve.distill.model import BOS_ID, EOS_ID, ModelConfig, Transformer, count_parameters
from wdserve.distill.synthetic import generate_pairs
from wdserve.distill.vocab import Vocab, train_sentencepiece
from wdserve.distill.wd import WeightGenerator
from wdserve.export.convert import ExportError, TransformerConverter, convert_checkpoint, export_all
from wdserve.export.verify import (
    FLOAT32_LOGPROB_TOLERANCE,
    SKIPPED_NEEDS_CUDA,
    greedy_mismatches,
    verify_export,
)

MAX_LENGTH = 24  # greedy steps; random models rarely stop on their own
TOLERANCE = 1e-4

SHAPES = {
    "pre-norm relu shared tied": {},
    "post-norm gelu": {"pre_norm": False, "activation": "gelu"},
    "untied": {"share_embeddings": False, "tie_output": False},
    "narrow 1-layer decoder": {"dec_layers": 1, "dec_dim": 16, "dec_heads": 2, "dec_ffn": 32,
                               "share_embeddings": False},
    "post-norm narrow untied gelu": {"pre_norm": False, "activation": "gelu", "dec_layers": 3, "dec_dim": 16,
                                     "dec_heads": 4, "dec_ffn": 24, "share_embeddings": False,
                                     "tie_output": False, "layer_norm_eps": 1e-3},
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Vocab, list[str]]:
    pairs = generate_pairs(300, seed=5)
    path = tmp_path_factory.mktemp("vocab") / "spm.model"
    vocab = Vocab(train_sentencepiece([t for pair in pairs for t in pair], path, 120))
    return vocab, [src for src, _ in generate_pairs(12, seed=6)]


def tiny_config(vocab: Vocab, **overrides) -> ModelConfig:
    values = {"vocab_size": len(vocab), "enc_layers": 2, "enc_dim": 32, "enc_heads": 4, "enc_ffn": 64,
              "dec_layers": 2, "dec_dim": 32, "dec_heads": 4, "dec_ffn": 64, "dropout": 0.0,
              "max_positions": 64}
    return ModelConfig(**{**values, **overrides})


def random_checkpoint(path: Path, vocab: Vocab, seed: int = 0, meta: dict | None = None,
                      **overrides) -> tuple[Path, Transformer]:
    torch.manual_seed(seed)
    model = Transformer(tiny_config(vocab, **overrides)).eval()
    with torch.no_grad():  # spread the output distribution so greedy search visits many tokens
        model.decoder.output_proj.weight.mul_(4.0)
    save_checkpoint(path, model, vocab, meta or {"name": "tiny", "method": "teacher",
                                                 "source_lang": "xx", "target_lang": "yy"})
    return path, model


def ct2_greedy(model_dir: Path, pieces: list[list[str]], compute_type: str = "default") -> list[list[str]]:
    translator = ctranslate2.Translator(str(model_dir), compute_type=compute_type)
    results = translator.translate_batch(pieces, beam_size=1, max_decoding_length=MAX_LENGTH,
                                         min_decoding_length=0)
    return [r.hypotheses[0] for r in results]


def max_logprob_diff(model: Transformer, vocab: Vocab, model_dir: Path, pieces: list[list[str]],
                     targets: list[list[int]]) -> float:
    """Largest |CTranslate2 - PyTorch| per-token log-probability of ``targets`` (+ </s>)."""
    scores = ctranslate2.Translator(str(model_dir)).score_batch(
        pieces, [[vocab.sp.id_to_piece(i) for i in t] for t in targets])
    src = pad_ids([[vocab.sp.piece_to_id(p) for p in s] + [EOS_ID] for s in pieces])
    tgt_in = pad_ids([[BOS_ID] + t for t in targets])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(src, tgt_in), dim=-1)
    worst = 0.0
    for row, (target, score) in enumerate(zip(targets, scores, strict=True)):
        gold = torch.tensor(target + [EOS_ID])
        ours = log_probs[row, : len(gold)].gather(1, gold[:, None])[:, 0].numpy()
        assert len(score.log_probs) == len(gold)
        worst = max(worst, float(np.abs(np.asarray(score.log_probs) - ours).max()))
    return worst


@pytest.mark.parametrize("overrides", SHAPES.values(), ids=SHAPES.keys())
def test_float32_export_matches_pytorch(tmp_path, corpus, overrides):
    vocab, sentences = corpus
    checkpoint, model = random_checkpoint(tmp_path / "model.pt", vocab, **overrides)
    out = convert_checkpoint(checkpoint, tmp_path / "ct2")
    pieces = [vocab.encode_pieces(s) for s in sentences]

    ours = greedy_search(model, pad_ids([vocab.encode(s) + [EOS_ID] for s in sentences]),
                         max_len_a=0, max_len_b=MAX_LENGTH)
    theirs = [[vocab.sp.piece_to_id(p) for p in h] for h in ct2_greedy(out, pieces)]
    assert theirs == ours
    if not model.config.tie_output:  # a random tied model just repeats <s>; the random targets cover it
        assert len({t for hyp in ours for t in hyp}) > 3, "greedy search should visit several tokens"

    generator = torch.Generator().manual_seed(1)
    random_targets = [torch.randint(4, len(vocab), (n,), generator=generator).tolist()
                      for n in range(3, 3 + len(sentences))]
    assert max_logprob_diff(model, vocab, out, pieces, ours) < TOLERANCE
    assert max_logprob_diff(model, vocab, out, pieces, random_targets) < TOLERANCE


def test_folded_weight_distilled_student_matches_pytorch(tmp_path, corpus):
    vocab, sentences = corpus
    torch.manual_seed(3)
    teacher = Transformer(tiny_config(vocab)).eval()
    student_cfg = tiny_config(vocab, **SHAPES["narrow 1-layer decoder"])
    student = WeightGenerator(teacher, student_cfg).fold().eval()
    checkpoint = tmp_path / "student.pt"
    save_checkpoint(checkpoint, student, vocab, {"name": "student", "method": "wd"})
    out = convert_checkpoint(checkpoint, tmp_path / "ct2")
    pieces = [vocab.encode_pieces(s) for s in sentences]
    hypotheses = [[vocab.sp.piece_to_id(p) for p in h] for h in ct2_greedy(out, pieces)]
    assert hypotheses == greedy_search(student, pad_ids([vocab.encode(s) + [EOS_ID] for s in sentences]),
                                       max_len_a=0, max_len_b=MAX_LENGTH)
    assert max_logprob_diff(student, vocab, out, pieces, hypotheses) < TOLERANCE


@pytest.mark.parametrize("overrides", [SHAPES["pre-norm relu shared tied"], SHAPES["narrow 1-layer decoder"]],
                         ids=["tied", "narrow"])
def test_int8_export_loads_translates_and_leaves_the_model_alone(tmp_path, corpus, overrides):
    vocab, sentences = corpus
    checkpoint, model = random_checkpoint(tmp_path / "model.pt", vocab, **overrides)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # The converter on a live model: int8 quantization scales arrays in place, so it must get copies.
    TransformerConverter(model, vocab).convert(str(tmp_path / "live-int8"), quantization="int8")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    int8 = convert_checkpoint(checkpoint, tmp_path / "int8", quantization="int8")
    fp32 = convert_checkpoint(checkpoint, tmp_path / "fp32", quantization="float32")
    assert (int8 / "model.bin").stat().st_size < 0.5 * (fp32 / "model.bin").stat().st_size
    hypotheses = ct2_greedy(int8, [vocab.encode_pieces(s) for s in sentences], compute_type="int8")
    known = set(vocab.tokens)
    assert all(hyp and set(hyp) <= known for hyp in hypotheses)


def test_model_dir_is_self_contained(tmp_path, corpus):
    vocab, _ = corpus
    meta = {"name": "student-x", "method": "wd", "source_lang": "xx", "target_lang": "yy",
            "teacher_sha256": "ab" * 32}
    checkpoint, model = random_checkpoint(tmp_path / "ckpt.pt", vocab, meta=meta, **SHAPES["untied"])
    out = convert_checkpoint(checkpoint, tmp_path / "out", quantization="int8")
    info = json.loads((out / "model.json").read_text())
    assert info["name"] == "student-x" and info["method"] == "wd"
    assert (info["source_lang"], info["target_lang"]) == ("xx", "yy")
    assert info["quantization"] == "int8"
    assert info["parameters"] == count_parameters(model)
    assert info["checkpoint_sha256"] == file_sha256(checkpoint)
    assert info["teacher_sha256"] == "ab" * 32
    assert ModelConfig.from_dict(info["architecture"]) == model.config
    assert (out / "sentencepiece.model").read_bytes() == vocab.model_bytes
    assert out.stat().st_mode & 0o005 == 0o005, "other users (a server container) must be able to read it"
    config = json.loads((out / "config.json").read_text())
    assert config["add_source_eos"] is True and config["decoder_start_token"] == "<s>"
    assert config["layer_norm_epsilon"] == pytest.approx(model.config.layer_norm_eps)
    assert json.loads((out / "shared_vocabulary.json").read_text()) == vocab.tokens


def test_existing_output_is_refused_unless_forced(tmp_path, corpus):
    vocab, _ = corpus
    checkpoint, _ = random_checkpoint(tmp_path / "ckpt.pt", vocab)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        convert_checkpoint(checkpoint, out)
    assert (out / "keep.txt").exists()
    convert_checkpoint(checkpoint, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.bin").is_file()


def _rewrite(checkpoint: Path, edit) -> Path:
    state = read_checkpoint(checkpoint)
    edit(state)
    torch.save(state, checkpoint)
    return checkpoint


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s["model"].pop("decoder.layers.1.cross_attn.k_proj.weight"), "missing tensors"),
        (lambda s: s["model"].__setitem__("encoder.layers.0.gate", torch.zeros(3)), "does not have"),
        (lambda s: s["config"].__setitem__("rotary", True), "unknown model config fields"),
        (lambda s: s["config"].__setitem__("enc_dim", 30), "not divisible"),
        (lambda s: s["config"].__setitem__("vocab_size", s["config"]["vocab_size"] + 1), "pieces but"),
        (lambda s: s["model"].__setitem__("encoder.layers.0.ffn.fc1.weight", torch.zeros(8, 32)), "shape"),
    ],
    ids=["missing tensor", "unknown tensor", "unknown option", "odd dims", "vocab mismatch", "bad shape"],
)
def test_unrepresentable_checkpoint_is_refused_clearly(tmp_path, corpus, edit, message):
    vocab, _ = corpus
    checkpoint, _ = random_checkpoint(tmp_path / "ckpt.pt", vocab)
    _rewrite(checkpoint, edit)
    with pytest.raises(ExportError, match=message):
        convert_checkpoint(checkpoint, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*")), "no temporary directory may be left behind"


def test_training_wrapper_state_is_refused(tmp_path, corpus):
    """A weight generator's state (what a WD phase-1 checkpoint holds) is not a model."""
    vocab, _ = corpus
    torch.manual_seed(0)
    teacher = Transformer(tiny_config(vocab))
    generator = WeightGenerator(teacher, tiny_config(vocab, dec_layers=1))
    path = tmp_path / "phase1.pt"
    torch.save({"config": generator.student_config.to_dict(), "model": generator.state_dict(),
                "vocab": vocab.model_bytes, "meta": {}}, path)
    with pytest.raises(ExportError, match="not a training wrapper"):
        convert_checkpoint(path, tmp_path / "out")


def test_failure_midway_leaves_no_half_model(tmp_path, corpus, monkeypatch):
    vocab, _ = corpus
    checkpoint, _ = random_checkpoint(tmp_path / "ckpt.pt", vocab)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("wdserve.export.convert.set_decoder", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_checkpoint(checkpoint, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_verify_export_reports_parity_quantization_and_skips(tmp_path, tiny_workdir):
    checkpoint = tiny_workdir / "models" / "teacher" / "checkpoint_best.pt"  # multi-word output: BLEU > 0
    dirs = export_all(checkpoint, tmp_path, ["float32", "int8", "float16"])
    assert dirs == {q: tmp_path / f"teacher-{q}" for q in ("float32", "int8", "float16")}
    sentences = (tiny_workdir / "data" / "test.src").read_text().splitlines()[:8]
    report = verify_export(checkpoint, dirs, sentences, max_decoding_length=40)
    json.dumps(report)  # must serialize as is into report.json
    fp32, int8, fp16 = (report["variants"][q] for q in ("float32", "int8", "float16"))
    assert report["float32_parity"] is True
    assert fp32["greedy_identical"] and fp32["identical_sentences"] == 8
    assert fp32["max_logprob_diff"] < TOLERANCE and fp32["bleu_vs_float32"] == 100.0
    assert int8["status"] == "ok" and 0 < int8["max_logprob_diff"] < 1.0
    assert 0.0 <= int8["bleu_vs_float32"] <= 100.0
    assert fp16["status"] == SKIPPED_NEEDS_CUDA


def test_verify_export_detects_a_wrong_model(tmp_path, tiny_workdir):
    """One student's export checked against another student's checkpoint must fail parity."""
    report = verify_export(tiny_workdir / "models" / "student-kd" / "checkpoint_best.pt",
                           {"float32": tiny_workdir / "export" / "student-float32"},
                           (tiny_workdir / "data" / "test.src").read_text().splitlines()[:4],
                           max_decoding_length=20)
    entry = report["variants"]["float32"]
    assert report["float32_parity"] is False
    assert entry["same_checkpoint"] is False and entry["max_logprob_diff"] > 1e-2


def test_greedy_check_takes_a_tie_for_a_pick_and_anything_else_for_a_mismatch():
    """An undertrained model's near-uniform output has ties that rounding breaks either way: the
    micro pipeline's WD student once failed parity on one, its log-probs 1e-6 from PyTorch's."""
    log_probs = torch.log_softmax(torch.tensor([
        [2.0, 1.0, 0.0],   # 0 is the argmax
        [1.0, 1.0, 0.0],   # 0 and 1 tie exactly: argmax says 0
        [1.0, 1.0 - FLOAT32_LOGPROB_TOLERANCE / 2, 0.0],  # a near tie
        [1.0, 1.0 - FLOAT32_LOGPROB_TOLERANCE * 2, 0.0],  # not a tie
    ]), dim=-1)
    assert greedy_mismatches(log_probs, torch.tensor([0, 0, 0, 0])) == ([], 0)
    assert greedy_mismatches(log_probs, torch.tensor([0, 1, 1, 0])) == ([], 2)
    assert greedy_mismatches(log_probs, torch.tensor([1, 1, 1, 1])) == ([0, 3], 2)


def wdserve_export(argv: list[str]) -> int:
    return main(["export", *argv])


def test_cli_exports_several_quantizations_and_verifies(tmp_path, tiny_workdir, capsys):
    checkpoint = tiny_workdir / "models" / "teacher" / "checkpoint_best.pt"
    report = tmp_path / "verify.json"
    code = wdserve_export([str(checkpoint), str(tmp_path / "out"),
                         "--quantization", "int8", "float32",
                         "--verify", "--verify-src", str(tiny_workdir / "data" / "test.src"),
                         "--verify-n", "5", "--report", str(report)])
    assert code == 0
    for quantization in ("int8", "float32"):
        info = json.loads((tmp_path / "out" / f"teacher-{quantization}" / "model.json").read_text())
        assert info["quantization"] == quantization and info["name"] == "teacher"
    result = json.loads(report.read_text())
    assert result["sentences"] == 5 and result["float32_parity"] is True
    table = capsys.readouterr().out
    assert "float32 parity" in table and "PASS" in table and "int8" in table

    assert wdserve_export([str(checkpoint), str(tmp_path / "single"), "-q", "int8"]) == 0
    assert json.loads((tmp_path / "single" / "model.json").read_text())["quantization"] == "int8"
    assert wdserve_export([str(checkpoint), str(tmp_path / "single"), "-q", "int8"]) == 1
    assert "--force" in capsys.readouterr().err
    assert wdserve_export([str(checkpoint), str(tmp_path / "x"), "--verify"]) == 2
