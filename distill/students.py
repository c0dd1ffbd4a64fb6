"""Student architectures and the one entry point that trains a student by any method.

Reference students follow the weight distillation paper's released code, relative to the teacher
(for the paper's 6+6 transformer-base teacher these are exactly its students):

- ``stu1``: the teacher's encoder (layers, width, heads, FFN); one decoder layer at half the
  teacher's decoder width and FFN with the teacher's number of heads, each half as wide
  (512/8/2048 -> 256/8/1024, head width 32: the authors' ``transformer_wmt_en_de_stu1`` changes
  only the width, FFN and layers). Where half the width does not split into the teacher's heads,
  the heads are halved too. Encoder and decoder widths differ, so embeddings are not shared.
  (Before issue #15 the heads were always halved, 256/4; on the tiny config, 3 seeds, the two
  shapes were within noise of each other: test BLEU 39.1 +- 11.6 halved, 34.7 +- 17.8 the authors'.)
- ``stu2``: the teacher's encoder; two decoder layers at the teacher's decoder width, heads, FFN.

``train_student`` methods (the ``StudentSpec`` options each reads in brackets; every TrainConfig
dict accepts any ``distill.train.TrainConfig`` field):

- ``seqkd``: plain training from scratch, on whatever pairs it is given (the pipeline gives it
  the teacher's translations, which makes it the sequence-level KD baseline). [train, word_kd,
  encoder_from_teacher: start from the teacher's encoder, copied (the students keep its shape)]
- ``kd``: word-level KD from scratch. [train, word_kd = {alpha: 0.5, temperature: 1.0},
  encoder_from_teacher]
- ``wd``: weight distillation: phase 1 trains the generator (``out_dir/phase1``), its best
  student is folded into plain weights, phase 2 fine-tunes them (``out_dir/phase2``).
  [phase1, phase2 (default: train), word_kd (phase 2), phase1_word_kd (phase 1),
  wd = {projections: shared|per-tensor, init: tanh|teacher} (``distill.wd``)]
- ``ws`` / ``gated-ws``: weight squeezing / gated weight squeezing through the same generator;
  phase 2 runs only when ``phase2`` is given. [phase1, phase2, word_kd, phase1_word_kd (``ws``
  default {alpha: 0.5, temperature: 1.0}, as the squeezing paper trains it: on the tiny config, 3
  seeds, test BLEU 55.04 +- 4.94 against 50.81 +- 8.69 without, higher on every seed; ``{alpha: 0}``
  turns it off; ``gated-ws`` default none, not measured with it), own_from (gated-ws: the trained
  student whose weights start ``W_own``; default a fresh one)]
- ``ckd``: combinatorial intermediate-layer KD from scratch. [train, encoder_from_teacher,
  ckd = {sides: [encoder] (or [decoder], [encoder, decoder]),
  mapping: regular_comb|overlap|cross_comb|skip_comb|skip_middle (the encoder's),
  decoder_mapping (default: mapping), alpha: 0.5, beta: 0.1, temperature: 1.0, reduction: mean|sum}
  (``wdserve.config.CKDOptions``)]

Every run goes through ``distill.train.train``: rerunning resumes, and a finished phase is not
trained again. The final student is always ``out_dir/checkpoint_best.pt``, an ordinary checkpoint
whose meta carries ``method`` and ``teacher_sha256``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from wdserve.artifacts import CHECKPOINT
from wdserve.config import DEFAULT_SEED, PRESETS, CKDOptions, StudentSpec
from wdserve.distill.model import ModelConfig

log = logging.getLogger(__name__)

DEFAULT_WORD_KD = {"alpha": 0.5, "temperature": 1.0}


def preset_fields(teacher: ModelConfig, preset: str) -> dict[str, Any]:
    """Architecture fields of a reference student, relative to ``teacher`` (module docstring)."""
    encoder = {"enc_layers": teacher.enc_layers, "enc_dim": teacher.enc_dim, "enc_heads": teacher.enc_heads,
               "enc_ffn": teacher.enc_ffn}
    if preset == "stu1":
        width = teacher.dec_dim // 2
        heads = teacher.dec_heads if width % teacher.dec_heads == 0 else max(1, teacher.dec_heads // 2)
        return {**encoder, "dec_layers": 1, "dec_dim": width, "dec_heads": heads,
                "dec_ffn": teacher.dec_ffn // 2}
    if preset == "stu2":
        return {**encoder, "dec_layers": 2, "dec_dim": teacher.dec_dim, "dec_heads": teacher.dec_heads,
                "dec_ffn": teacher.dec_ffn}
    raise ValueError(f"unknown student preset {preset!r}; expected one of {PRESETS}")


def student_config(
    teacher_config: ModelConfig,
    preset: str | dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
) -> ModelConfig:
    """The teacher's config changed by a preset (``"stu1"``/``"stu2"``) and/or a dict of fields.

    ``preset`` may itself be the overrides dict. Anything not given stays the teacher's (vocabulary,
    norms, activation, dropout, positions). ``share_embeddings`` turns off by itself when the
    widths differ, unless the overrides ask for it explicitly.
    """
    if isinstance(preset, dict):
        preset, overrides = None, {**preset, **(overrides or {})}
    overrides = dict(overrides or {})
    values = teacher_config.to_dict()
    if preset is not None:
        values.update(preset_fields(teacher_config, preset))
    if overrides.get("vocab_size", values["vocab_size"]) != values["vocab_size"]:
        raise ValueError(f"a student shares the teacher's vocabulary: vocab_size must stay "
                         f"{values['vocab_size']}, got {overrides['vocab_size']}")
    values.update(overrides)
    if values["enc_dim"] != values["dec_dim"] and "share_embeddings" not in overrides:
        values["share_embeddings"] = False
    return ModelConfig.from_dict(values)


def train_student(
    teacher_checkpoint: Path,
    spec: StudentSpec,
    student_cfg: ModelConfig,
    train_pairs: list[tuple[str, str]],
    valid_pairs: list[tuple[str, str]],
    out_dir: Path,
    device: str = "cpu",
    own_checkpoint: Path | None = None,
) -> Path:
    """Trains student ``spec.name`` by ``spec.method`` and returns ``out_dir/checkpoint_best.pt``
    (module doc); the spec's options say how, and ``student_cfg`` is its shape. ``own_checkpoint``
    (gated-ws, ``spec.own_from``): the trained student whose weights start ``W_own``."""
    import torch

    from wdserve.distill.batching import encode_pairs
    from wdserve.distill.checkpoint import file_sha256, load_model
    from wdserve.distill.kd import frozen
    from wdserve.distill.train import TrainConfig

    name, method = spec.name, spec.method
    ignored = spec.ignored_options()
    if ignored:
        log.warning("student %s: options %s do not apply to method %s and are ignored", name, ignored, method)
    out_dir = Path(out_dir)
    seed = DEFAULT_SEED if spec.seed is None else spec.seed

    def train_config(key: str, fallback: str | None = None) -> TrainConfig:
        values = getattr(spec, key)
        if values is None and fallback:
            values = getattr(spec, fallback)
        return TrainConfig.from_dict({"seed": seed, **(values or {})})

    teacher, vocab, state = load_model(teacher_checkpoint, device)
    frozen(teacher)
    teacher_meta = state.get("meta", {})
    meta = {"name": name, "method": method, "teacher_sha256": file_sha256(teacher_checkpoint),
            "source_lang": teacher_meta.get("source_lang"), "target_lang": teacher_meta.get("target_lang"),
            "teacher_name": teacher_meta.get("name")}
    examples = encode_pairs(vocab, train_pairs)
    log.info("student %s: %s from %s, %d training pairs, architecture %s", name, method, teacher_checkpoint,
             len(examples), student_cfg.to_dict())
    torch.manual_seed(seed)

    if spec.own_from is not None and own_checkpoint is None:
        raise ValueError(f"student {name}: own_from {spec.own_from!r} needs that student's checkpoint")
    if spec.phased:
        own = load_model(own_checkpoint, device)[0] if own_checkpoint is not None else None
        return _train_phased(teacher, vocab, examples, valid_pairs, student_cfg, out_dir, meta,
                             spec, train_config, device, own)
    from wdserve.distill.model import Transformer
    from wdserve.distill.train import train

    cfg = train_config("train")
    student = Transformer(student_cfg).to(device)
    if spec.encoder_from_teacher:
        copy_encoder(teacher, student)
        meta["encoder_from_teacher"] = True
    if method == "ckd":
        from wdserve.distill.ckd import CKDLoss, CKDStudent, ckd_groups, student_of

        ckd = spec.ckd or CKDOptions()
        layers = {"encoder": (teacher.config.enc_layers, student_cfg.enc_layers),
                  "decoder": (teacher.config.dec_layers, student_cfg.dec_layers)}
        groups = {side: ckd_groups(*layers[side], ckd.mapping_of(side), side) for side in ckd.sides}
        module = CKDStudent(student, teacher.config.enc_dim, groups.get("encoder", []),
                            groups.get("decoder", []), teacher.config.dec_dim).to(device)
        loss_fn = CKDLoss(teacher, alpha=ckd.alpha, beta=ckd.beta, temperature=ckd.temperature,
                          label_smoothing=cfg.label_smoothing, reduction=ckd.reduction)
        result = train(module, vocab, examples, valid_pairs, cfg, out_dir, {**meta, "ckd_groups": groups},
                       loss_fn=loss_fn, student_of=student_of)
    else:
        word_kd = spec.word_kd if spec.word_kd is not None else DEFAULT_WORD_KD if method == "kd" else None
        result = train(student, vocab, examples, valid_pairs, cfg, out_dir, meta,
                       loss_fn=_word_kd_loss(teacher, word_kd, cfg))
    return result.best_path


def _word_kd_loss(teacher, word_kd: dict[str, Any] | None, cfg):
    """A ``WordKDLoss`` for ``word_kd = {alpha, temperature}``, or None (the trainer's default loss)."""
    if not word_kd:
        return None
    from wdserve.distill.kd import WordKDLoss

    return WordKDLoss(teacher, label_smoothing=cfg.label_smoothing, **{**DEFAULT_WORD_KD, **word_kd})


def copy_encoder(teacher, student) -> None:
    """The teacher's encoder into ``student`` (the teacher-initialised KD baseline): same shape required."""
    import torch

    source, target = teacher.encoder.state_dict(), student.encoder.state_dict()
    misshapen = sorted(k for k in target if k not in source or source[k].shape != target[k].shape)
    if misshapen:
        raise ValueError(f"encoder_from_teacher: the student's encoder differs from the teacher's at "
                         f"{misshapen}")
    with torch.no_grad():
        student.encoder.load_state_dict(source)


def _train_phased(teacher, vocab, examples, valid_pairs, student_cfg, out_dir, meta, spec, train_config,
                  device, own) -> Path:
    """Phase 1 trains the generator; its best student, folded, is fine-tuned in phase 2 (if any)."""
    from wdserve.distill.checkpoint import atomic_write, load_model
    from wdserve.distill.train import train
    from wdserve.distill.wd import WeightGenerator, live_student

    method = spec.method
    generator = WeightGenerator(teacher, student_cfg, mode=method, own=own, **(spec.wd or {})).to(device)
    cfg1 = train_config("phase1", "train")
    phase1_kd = spec.phase1_word_kd
    if phase1_kd is None and method == "ws":
        phase1_kd = DEFAULT_WORD_KD  # the squeezing paper trains with KD (tiny config: module doc)
    phase1 = train(generator, vocab, examples, valid_pairs, cfg1, out_dir / "phase1", {**meta, "phase": 1},
                   loss_fn=_word_kd_loss(teacher, phase1_kd, cfg1), student_of=live_student)
    final = phase1.best_path
    del generator
    if method == "wd" or spec.phase2 is not None:
        cfg = train_config("phase2", "train")
        student, _, _ = load_model(phase1.best_path, device)  # the folded generator: plain weights
        student.train()
        log.info("%s: phase 2 fine-tunes the folded student of %s (dev BLEU %.2f)", meta["name"],
                 phase1.best_path, phase1.best_bleu)
        phase2 = train(student, vocab, examples, valid_pairs, cfg, out_dir / "phase2", {**meta, "phase": 2},
                       loss_fn=_word_kd_loss(teacher, spec.word_kd, cfg))
        final = phase2.best_path
    best = out_dir / CHECKPOINT
    content = final.read_bytes()
    if not best.is_file() or best.read_bytes() != content:  # a rerun leaves a finished student alone
        atomic_write(best, lambda handle: handle.write(content))
        log.info("%s: final student %s (copied from %s)", meta["name"], best, final)
    return best
