"""``wdserve distill``: train one student from a teacher checkpoint.

    wdserve distill --teacher runs/m30k/models/teacher/checkpoint_best.pt --method wd --preset stu1 \\
        --train-src train.de --train-tgt train.en --valid-src val.de --valid-tgt val.en \\
        --out models/stu1 --seqkd --config stu1.yaml

``--config`` (YAML or JSON) holds the student's settings, the same keys as a pipeline ``students:``
entry: ``preset``, ``model`` (ModelConfig fields), ``seqkd`` (``true`` or ``{beam_size, with_bitext}``)
and the method options of ``distill.students.train_student`` (``train``, ``phase1``, ``phase2``,
``word_kd``, ``ckd``, ``seed``). Flags override the file. With ``--seqkd`` the teacher first translates
the training sources (cached in ``OUT/seqkd/train.tgt``) and the student trains on the distilled
pairs plus the original bitext (``--no-bitext``: distilled pairs only). Rerunning resumes.
No PyTorch import at module level.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from wdserve.distill.train_cli import add_corpus_arguments

log = logging.getLogger(__name__)

METHOD_CHOICES = ("wd", "kd", "seqkd", "ws", "gated-ws", "ckd")  # == distill.students.METHODS
ARCHITECTURE_FLAGS = ("enc_layers", "enc_dim", "enc_heads", "enc_ffn", "dec_layers", "dec_dim", "dec_heads",
                      "dec_ffn")
CONFIG_KEYS = ("preset", "model", "seqkd", "seed", "train", "phase1", "phase2", "word_kd", "ckd")


def configure_distill(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", type=Path, required=True, help="teacher checkpoint (.pt)")
    parser.add_argument("--method", required=True, choices=METHOD_CHOICES,
                        help="wd: weight distillation; kd: word-level KD; seqkd: plain training (on "
                             "distilled data with --seqkd); ws / gated-ws: weight squeezing; ckd: "
                             "combinatorial intermediate-layer KD")
    add_corpus_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="output directory (resumes if present)")
    parser.add_argument("--name", default=None, help="student name in the checkpoint (default: --out's name)")
    parser.add_argument("--config", type=Path, default=None, help="YAML/JSON student settings (see above)")
    parser.add_argument("--preset", choices=("stu1", "stu2"), default=None,
                        help="stu1: teacher's encoder + 1 decoder layer at half width; "
                             "stu2: teacher's encoder + 2 decoder layers at full width")
    for field in ARCHITECTURE_FLAGS:
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=None,
                            help=f"student {field} (overrides the preset)")
    parser.add_argument("--seqkd", action="store_true",
                        help="train on the teacher's beam-search translations of the training sources")
    parser.add_argument("--no-bitext", action="store_true",
                        help="with --seqkd: leave the original bitext out of the training pairs")
    parser.add_argument("--beam-size", type=int, default=None, help="--seqkd beam size (default 4)")
    parser.add_argument("--ct2-teacher", type=Path, default=None,
                        help="exported CTranslate2 teacher for --seqkd (faster than PyTorch beam search)")
    parser.add_argument("--max-steps", type=int, default=None, help="max_steps of every training phase")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present)")


def read_student_config(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    import yaml  # JSON is YAML too

    try:
        config = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise SystemExit(f"cannot read distill config {path}: {err}") from err
    if not isinstance(config, dict):
        raise SystemExit(f"{path}: expected a mapping of student settings, got {type(config).__name__}")
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise SystemExit(f"{path}: unknown keys {unknown}; known: {list(CONFIG_KEYS)}")
    return config


def run_distill(args: argparse.Namespace) -> int:
    import torch

    from wdserve.distill.checkpoint import read_checkpoint
    from wdserve.distill.data import DataError, read_parallel
    from wdserve.distill.model import ModelConfig
    from wdserve.distill.students import student_config, train_student

    config = read_student_config(args.config)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = args.name or args.out.name
    try:
        teacher_config = ModelConfig.from_dict(read_checkpoint(args.teacher)["config"])
        architecture = {**config.get("model", {}),
                        **{f: getattr(args, f) for f in ARCHITECTURE_FLAGS if getattr(args, f) is not None}}
        student = student_config(teacher_config, args.preset or config.get("preset"), architecture)
        train_pairs = read_parallel(args.train_src, args.train_tgt)
        valid_pairs = read_parallel(args.valid_src, args.valid_tgt)
        seqkd = config.get("seqkd", False)
        if args.seqkd or seqkd:
            seqkd = seqkd if isinstance(seqkd, dict) else {}
            train_pairs = distilled_pairs(
                args.teacher, train_pairs, args.out / "seqkd" / "train.tgt",
                beam_size=args.beam_size or seqkd.get("beam_size", 4),
                with_bitext=not args.no_bitext and seqkd.get("with_bitext", True),
                ct2_model_dir=args.ct2_teacher, device=device,
            )
        options = {k: v for k, v in config.items() if k not in ("preset", "model", "seqkd")}
        if args.seed is not None:
            options["seed"] = args.seed
        if args.max_steps is not None:
            for phase in ("train", "phase1", "phase2"):
                if phase in options or phase == "train":
                    options[phase] = {**(options.get(phase) or {}), "max_steps": args.max_steps}
        path = train_student(args.teacher, name, args.method, student, train_pairs, valid_pairs, args.out,
                             options, device=device)
    except (DataError, OSError, ValueError, TypeError) as err:
        print(f"wdserve distill: error: {err}", file=sys.stderr)
        return 1
    print(f"student {name} ({args.method}): {path}")
    return 0


def distilled_pairs(
    teacher: Path, bitext: list[tuple[str, str]], out_path: Path, beam_size: int, with_bitext: bool,
    ct2_model_dir: Path | None, device: str,
) -> list[tuple[str, str]]:
    """(source, teacher translation) pairs, empty translations dropped, optionally plus the bitext."""
    from wdserve.distill.seqkd import generate_seqkd_targets

    targets = generate_seqkd_targets(teacher, [src for src, _ in bitext], out_path, beam_size=beam_size,
                                     ct2_model_dir=ct2_model_dir, device=device)
    distilled = [(src, hyp) for (src, _), hyp in zip(bitext, targets, strict=True) if hyp.strip()]
    log.info("sequence-level KD: %d distilled pairs%s", len(distilled),
             f" + {len(bitext)} bitext pairs" if with_bitext else "")
    return distilled + bitext if with_bitext else distilled
