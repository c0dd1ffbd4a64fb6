"""Students end to end: presets, every method through train_student, seqkd caching, the CLI."""

from __future__ import annotations

import argparse
import json
import logging

import pytest
import torch

from wdserve.config import StudentSpec
from wdserve.distill.checkpoint import file_sha256, load_model, read_checkpoint, save_checkpoint
from wdserve.distill.model import ModelConfig, Transformer
from wdserve.distill.seqkd import generate_seqkd_targets
from wdserve.distill.students import student_config, train_student
from wdserve.distill.synthetic import generate_pairs
from wdserve.distill.vocab import Vocab, train_sentencepiece
from wdserve.distill.wd import WeightGenerator, live_student

torch.set_num_threads(1)

TEACHER = {"enc_layers": 4, "enc_dim": 32, "enc_heads": 4, "enc_ffn": 64,
           "dec_layers": 2, "dec_dim": 32, "dec_heads": 4, "dec_ffn": 64,
           "dropout": 0.0, "max_positions": 64}
FAST = {"max_tokens": 400, "lr": 0.003, "warmup_steps": 2, "max_steps": 8, "eval_every": 4,
        "log_every": 4, "label_smoothing": 0.0}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A vocabulary, 60 training and 3 dev pairs, and a random-init teacher checkpoint."""
    root = tmp_path_factory.mktemp("students")
    train_pairs, valid_pairs = generate_pairs(60, seed=3), generate_pairs(3, seed=4)
    vocab = Vocab(train_sentencepiece([t for p in train_pairs for t in p], root / "spm.model", 120))
    torch.manual_seed(0)
    teacher = Transformer(ModelConfig(vocab_size=len(vocab), **TEACHER))
    meta = {"name": "teacher", "method": "teacher", "source_lang": "xx", "target_lang": "yy"}
    save_checkpoint(root / "teacher.pt", teacher, vocab, meta)
    return {"root": root, "teacher": root / "teacher.pt", "config": teacher.config, "train": train_pairs,
            "valid": valid_pairs}


def test_presets_follow_the_paper_for_a_base_teacher():
    base = ModelConfig(vocab_size=100)  # transformer-base: 6+6 layers, 512 wide, 8 heads, FFN 2048
    stu1, stu2 = student_config(base, "stu1"), student_config(base, "stu2")
    assert (stu1.enc_layers, stu1.enc_dim, stu1.enc_ffn) == (6, 512, 2048)
    assert (stu1.dec_layers, stu1.dec_dim, stu1.dec_heads, stu1.dec_ffn) == (1, 256, 8, 1024)  # head width 32
    assert not stu1.share_embeddings
    assert (stu2.enc_layers, stu2.dec_layers, stu2.dec_dim, stu2.dec_ffn) == (6, 2, 512, 2048)
    assert stu2.share_embeddings
    tiny = student_config(ModelConfig(vocab_size=100, **TEACHER), "stu1")
    assert (tiny.dec_dim, tiny.dec_heads, tiny.dec_ffn, tiny.max_positions) == (16, 4, 32, 64)
    narrow = ModelConfig(vocab_size=100, enc_dim=24, enc_heads=8, dec_dim=24, dec_heads=8)
    odd = student_config(narrow, "stu1")
    assert (odd.dec_dim, odd.dec_heads) == (12, 4)  # 12 does not split into 8 heads: halve them
    custom = student_config(base, {"dec_layers": 3, "dec_dim": 128, "dec_heads": 4})
    assert (custom.dec_layers, custom.dec_dim, custom.enc_layers) == (3, 128, 6)
    assert not custom.share_embeddings  # widths differ
    assert student_config(base, "stu2", {"dec_layers": 3}).dec_layers == 3
    with pytest.raises(ValueError, match="vocab_size must stay 100"):
        student_config(base, {"vocab_size": 7})
    with pytest.raises(ValueError, match="unknown student preset"):
        student_config(base, "stu9")


def test_live_student_follows_the_generator_as_it_trains(kit):
    generator = WeightGenerator(kit.teacher(), kit.config(enc_layers=2, dec_layers=1, dec_dim=16, dec_heads=2,
                                                          share_embeddings=False))
    student = live_student(generator)
    kit.steps_lower_loss(generator, lambda m, b: (m(b.src, b.tgt_in).logsumexp(-1).sum(), {}), kit.batch(),
                         steps=2)
    folded = generator.fold().state_dict()
    state = student.state_dict()  # reading the state syncs the live student
    assert all(torch.equal(state[k], folded[k]) for k in folded)


def losses(run_dir) -> list[float]:
    history = read_checkpoint(run_dir / "checkpoint_last.pt")["train_state"]["history"]
    return [entry["train_loss"] for entry in history if "train_loss" in entry]


@pytest.mark.parametrize("method", ["seqkd", "kd", "ckd", "ws", "gated-ws"])
def test_single_phase_methods_train_a_plain_student(corpus, tmp_path, method, caplog):
    cfg = student_config(corpus["config"], {"enc_layers": 2, "dec_layers": 1, "dec_dim": 16, "dec_heads": 2,
                                            "dec_ffn": 32})
    options = {"train": FAST, "phase1": FAST, "seed": 2}
    if method == "ckd":
        options["ckd"] = {"sides": ["encoder", "decoder"], "mapping": "overlap",
                          "decoder_mapping": "cross_comb", "alpha": 0.3, "beta": 0.3}
    out = tmp_path / method
    spec = StudentSpec(f"s-{method}", method, **options)
    with caplog.at_level(logging.INFO):
        path = train_student(corpus["teacher"], spec, cfg, corpus["train"], corpus["valid"], out)
    # Word-level KD terms: kd always, ws in its generator phase by default (the squeezing paper's).
    assert (" kl " in caplog.text) == (method in ("kd", "ws", "ckd")), method
    assert path == out / "checkpoint_best.pt"
    model, _, state = load_model(path)
    assert model.config == cfg
    assert state["meta"]["method"] == method
    assert state["meta"]["teacher_sha256"] == file_sha256(corpus["teacher"])
    if method == "ckd":  # 4 teacher encoder layers -> 2, 2 decoder layers -> 1
        assert state["meta"]["ckd_groups"] == {"encoder": [[1, 2, 3], [2, 3, 4]], "decoder": [[1, 2]]}
        assert " intermediate_decoder " in caplog.text
    run_dir = out / "phase1" if method in ("ws", "gated-ws") else out
    first, last = losses(run_dir)
    assert last < first


def test_weight_distillation_runs_both_phases_and_resumes(corpus, tmp_path, caplog):
    cfg = student_config(corpus["config"], "stu1")  # k = 4 on the decoder, narrower decoder
    spec = StudentSpec("student", "wd", phase1=FAST, phase2={**FAST, "max_steps": 8}, word_kd={"alpha": 0.5})
    out = tmp_path / "wd"
    path = train_student(corpus["teacher"], spec, cfg, corpus["train"], corpus["valid"], out)
    for phase in ("phase1", "phase2"):
        first, last = losses(out / phase)
        assert last < first, phase
    final = read_checkpoint(path)
    assert final["meta"]["method"] == "wd" and final["meta"]["phase"] == 2
    assert list(final["model"]) == list(Transformer(cfg).state_dict())
    # Phase 2 trained the folded phase-1 student further.
    folded = read_checkpoint(out / "phase1" / "checkpoint_best.pt")["model"]
    name = "decoder.layers.0.ffn.fc1.weight"
    assert not torch.equal(folded[name], final["model"][name])
    before = path.stat().st_mtime_ns, (out / "phase2" / "checkpoint_last.pt").stat().st_mtime_ns
    with caplog.at_level(logging.INFO):
        train_student(corpus["teacher"], spec, cfg, corpus["train"], corpus["valid"], out)
    assert (out / "phase2" / "checkpoint_last.pt").stat().st_mtime_ns == before[1]
    assert "not training again" in caplog.text


@pytest.mark.parametrize("method", ["wd", "gated-ws"])
def test_phase_2_starts_from_the_folded_phase_1_best(corpus, tmp_path, method):
    """With a learning rate of 1e-9 phase 2 cannot move: its student is the phase-1 best, folded."""
    cfg = student_config(corpus["config"], "stu1")
    spec = StudentSpec("student", method, phase1=FAST, phase2={**FAST, "lr": 1e-9, "max_steps": 2,
                                                                 "eval_every": 2})
    path = train_student(corpus["teacher"], spec, cfg, corpus["train"], corpus["valid"], tmp_path / method)
    folded = read_checkpoint(tmp_path / method / "phase1" / "checkpoint_best.pt")["model"]
    final = read_checkpoint(path)
    assert final["meta"]["phase"] == 2
    for name, tensor in folded.items():
        torch.testing.assert_close(final["model"][name], tensor, atol=1e-6, rtol=0, msg=name)


def test_gated_ws_starts_w_own_from_the_given_student(corpus, tmp_path):
    cfg = student_config(corpus["config"], "stu1")
    own = tmp_path / "own.pt"
    model, vocab, _ = load_model(corpus["teacher"])
    torch.manual_seed(5)
    save_checkpoint(own, Transformer(cfg), vocab, {"name": "own"})
    spec = StudentSpec("gated", "gated-ws", own_from="seqkd-student", phase1={**FAST, "max_steps": 1})
    with pytest.raises(ValueError, match="own_from 'seqkd-student' needs"):
        train_student(corpus["teacher"], spec, cfg, corpus["train"], corpus["valid"], tmp_path / "g")
    teacher, _, _ = load_model(corpus["teacher"])
    generator = WeightGenerator(teacher, cfg, mode="gated-ws", own=load_model(own)[0])
    expected = read_checkpoint(own)["model"]["decoder.layers.0.ffn.fc1.weight"]
    own_weight = generator.generators["decoder__layers__0__ffn__fc1__weight"].own.detach()
    torch.testing.assert_close(own_weight, expected)


@pytest.mark.parametrize("method", ["seqkd", "ckd"])
def test_encoder_from_teacher_starts_the_student_from_the_teachers_encoder(corpus, tmp_path, method):
    cfg = student_config(corpus["config"], "stu1")
    spec = StudentSpec("s", method, encoder_from_teacher=True,
                       train={**FAST, "lr": 1e-9, "max_steps": 2, "eval_every": 2})
    path = train_student(corpus["teacher"], spec, cfg, corpus["train"], corpus["valid"], tmp_path / method)
    teacher = read_checkpoint(corpus["teacher"])["model"]
    student = read_checkpoint(path)
    assert student["meta"]["encoder_from_teacher"]
    encoder = [name for name in student["model"] if name.startswith("encoder.")]
    assert encoder
    for name in encoder:
        torch.testing.assert_close(student["model"][name], teacher[name], atol=1e-6, rtol=0, msg=name)


def test_seqkd_cache_is_reused_and_regenerated_when_the_teacher_changes(corpus, tmp_path, caplog):
    sources = [src for src, _ in corpus["train"][:6]]
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(corpus["teacher"].read_bytes())
    out = tmp_path / "seqkd" / "train.tgt"
    with caplog.at_level(logging.INFO):
        first = generate_seqkd_targets(teacher, sources, out, beam_size=2)
    assert len(first) == 6 and out.read_text().count("\n") == 6
    info = json.loads(out.with_name("train.tgt.json").read_text())
    assert (info["teacher_sha256"], info["beam_size"], info["lines"], info["generator"]) == (
        file_sha256(teacher), 2, 6, "pytorch")
    stamp = out.stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert generate_seqkd_targets(teacher, sources, out, beam_size=2) == first
    assert out.stat().st_mtime_ns == stamp and "reusing 6 distilled targets" in caplog.text

    model, vocab, _ = load_model(teacher)
    torch.manual_seed(9)
    save_checkpoint(teacher, Transformer(model.config), vocab, {"name": "teacher"})
    caplog.clear()
    with caplog.at_level(logging.INFO):
        generate_seqkd_targets(teacher, sources, out, beam_size=2)
    assert "teacher_sha256" in caplog.text and "stale" in caplog.text
    assert json.loads(out.with_name("train.tgt.json").read_text())["teacher_sha256"] == file_sha256(teacher)
    generate_seqkd_targets(teacher, sources, out, beam_size=3)  # another beam also regenerates
    assert json.loads(out.with_name("train.tgt.json").read_text())["beam_size"] == 3


def test_seqkd_uses_the_ctranslate2_teacher_only_when_it_is_this_teacher(tiny_workdir, tmp_path):
    from wdserve.distill.decode import translate

    teacher = tiny_workdir / "models" / "teacher" / "checkpoint_best.pt"
    sources = (tiny_workdir / "data" / "valid.src").read_text().splitlines()[:3]
    out = tmp_path / "ct2.tgt"
    hypotheses = generate_seqkd_targets(teacher, sources, out, beam_size=2,
                                        ct2_model_dir=tiny_workdir / "export" / "teacher-float32")
    assert json.loads(out.with_name("ct2.tgt.json").read_text())["generator"] == "ctranslate2"
    model, vocab, _ = load_model(teacher)
    assert hypotheses == translate(model, vocab, sources, beam_size=2)  # same search, same result
    stale = tmp_path / "stale.tgt"  # a student's export is not this teacher: PyTorch takes over
    generate_seqkd_targets(teacher, sources, stale, beam_size=2,
                           ct2_model_dir=tiny_workdir / "export" / "student-float32")
    assert json.loads(stale.with_name("stale.tgt.json").read_text())["generator"] == "pytorch"


def test_wdserve_distill_command(corpus, tmp_path):
    from wdserve.distill.cli import configure_distill, run_distill
    from wdserve.distill.data import write_parallel
    from wdserve.errors import WdserveError

    write_parallel(corpus["train"][:12], tmp_path / "train.src", tmp_path / "train.tgt")
    write_parallel(corpus["valid"], tmp_path / "valid.src", tmp_path / "valid.tgt")
    (tmp_path / "student.yaml").write_text("train: {max_tokens: 400, lr: 0.003, warmup_steps: 2}\n")
    parser = argparse.ArgumentParser()
    configure_distill(parser)
    common = ["--teacher", str(corpus["teacher"]), "--train-src", str(tmp_path / "train.src"),
              "--train-tgt", str(tmp_path / "train.tgt"), "--valid-src", str(tmp_path / "valid.src"),
              "--valid-tgt", str(tmp_path / "valid.tgt"), "--config", str(tmp_path / "student.yaml"),
              "--device", "cpu", "--max-steps", "2"]
    args = parser.parse_args([*common, "--method", "seqkd", "--out", str(tmp_path / "kd"), "--preset", "stu1",
                              "--dec-layers", "2", "--seqkd", "--beam-size", "1"])
    run_distill(args)
    model, _, state = load_model(tmp_path / "kd" / "checkpoint_best.pt")
    assert (model.config.dec_layers, model.config.dec_dim, state["meta"]["name"]) == (2, 16, "kd")
    assert (tmp_path / "kd" / "seqkd" / "train.tgt").read_text().count("\n") == 12
    # k not a multiple: a clear error, no traceback.
    args = parser.parse_args([*common, "--method", "wd", "--out", str(tmp_path / "bad"), "--enc-layers", "3"])
    with pytest.raises(WdserveError, match="multiple"):
        run_distill(args)
