"""``wdserve data``, ``train``, ``import``, ``evaluate`` and ``distill``: the PyTorch stage's subcommands.

    wdserve data synthetic corpus/
    wdserve import Helsinki-NLP/opus-mt-de-en --out models/teacher
    wdserve train --train-src train.de --train-tgt train.en --valid-src val.de --valid-tgt val.en \\
        --vocab spm.model --out models/teacher --config teacher.yaml --max-steps 20000
    wdserve distill --teacher runs/m30k/models/teacher/checkpoint_best.pt --method wd --preset stu1 \\
        --train-src train.de --train-tgt train.en --valid-src val.de --valid-tgt val.en \\
        --out models/stu1 --seqkd --config stu1.yaml
    wdserve evaluate models/stu1/checkpoint_best.pt --src test.de --ref test.en

``train --config`` is YAML or JSON with two optional sections, ``model:`` (ModelConfig fields,
vocab_size comes from the vocabulary) and ``train:`` (TrainConfig fields).

``distill --config`` holds the student's settings, the same keys as a pipeline ``students:`` entry:
``preset``, ``model`` (ModelConfig fields), ``seqkd`` (``true`` or ``{beam_size, with_bitext}``) and the
method options of ``distill.students.train_student`` (``train``, ``phase1``, ``phase2``, ``word_kd``,
``ckd``, ``seed``). With ``--seqkd`` the teacher first translates the training sources (cached in
``OUT/seqkd/train.tgt``) and the student trains on the distilled pairs plus the original bitext
(``--no-bitext``: distilled pairs only).

Flags override the config file, and rerunning ``train`` or ``distill`` resumes from ``--out``.
PyTorch and CTranslate2 are imported inside ``run_*`` only, so building the command-line parser
stays light; the method and preset lists belong to ``wdserve.config``, the quantization list to
``export.convert`` (read from it when argparse needs it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

from wdserve.config import METHODS, PRESETS, StudentSpec, from_dict
from wdserve.errors import ConfigError, WdserveError

log = logging.getLogger(__name__)

# flag -> TrainConfig field, for the settings people change most between runs
TRAIN_OVERRIDES = {"max_steps": int, "max_tokens": int, "lr": float, "warmup_steps": int,
                   "eval_every": int, "seed": int, "device": str}
ARCHITECTURE_FLAGS = ("enc_layers", "enc_dim", "enc_heads", "enc_ffn", "dec_layers", "dec_dim", "dec_heads",
                      "dec_ffn")
# distill --config: a pipeline students: entry without name, method and data, plus seqkd
DISTILL_KEYS = (*(f.name for f in fields(StudentSpec) if f.name not in ("name", "method", "data")), "seqkd")


# ---------------------------------------------------------------------------------------------------
# wdserve data


def configure_data(parser: argparse.ArgumentParser) -> None:
    from wdserve.distill.data import MULTI30K_URL

    sub = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    synthetic = sub.add_parser(
        "synthetic", help="write the invented xx->yy language pair (see distill/synthetic.py)",
        description="Writes {train,valid,test}.{src,tgt}: an invented language pair a tiny model "
                    "learns fast.",
    )
    synthetic.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    synthetic.add_argument("--train", type=int, default=10_000, help="training pairs (default 10000)")
    synthetic.add_argument("--valid", type=int, default=200, help="validation pairs (default 200)")
    synthetic.add_argument("--test", type=int, default=200, help="test pairs (default 200)")
    synthetic.add_argument("--seed", type=int, default=1)

    multi30k = sub.add_parser(
        "multi30k", help="download Multi30k task 1 (de, en, fr) from its GitHub repository",
        description="Downloads {train,val,test_2016_flickr}.{de,en,fr}.gz. Offline? Point the config's "
                    "data.dir (or --data-dir) at an existing copy of those files instead.",
    )
    multi30k.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    multi30k.add_argument("--base-url", default=MULTI30K_URL,
                          help="where the files are (default: %(default)s)")
    multi30k.add_argument("--timeout", type=float, default=60.0, help="seconds per request")


def run_data(args: argparse.Namespace) -> None:
    if args.source == "synthetic":
        from wdserve.distill.synthetic import write_synthetic

        sizes = {"train": args.train, "valid": args.valid, "test": args.test}
        if any(n < 1 for n in sizes.values()):
            raise ConfigError(f"every split needs at least one pair, got {sizes}")
        with _user_errors(OSError):
            write_synthetic(args.out_dir, sizes=sizes, seed=args.seed)
        print(f"wrote {', '.join(f'{n} {split}' for split, n in sizes.items())} pairs to {args.out_dir}")
    else:
        from wdserve.distill.data import download_multi30k

        with _user_errors(OSError):
            paths = download_multi30k(args.out_dir, base_url=args.base_url, timeout=args.timeout)
        print(f"Multi30k: {len(paths)} files in {args.out_dir}")


# ---------------------------------------------------------------------------------------------------
# wdserve train


def add_corpus_arguments(parser: argparse.ArgumentParser) -> None:
    """The training and dev files every training command reads."""
    parser.add_argument("--train-src", type=Path, required=True, help="training source sentences")
    parser.add_argument("--train-tgt", type=Path, required=True, help="training target sentences")
    parser.add_argument("--valid-src", type=Path, required=True, help="dev source sentences (dev BLEU)")
    parser.add_argument("--valid-tgt", type=Path, required=True, help="dev reference translations")


def configure_train(parser: argparse.ArgumentParser) -> None:
    add_corpus_arguments(parser)
    parser.add_argument("--vocab", type=Path, required=True, help="SentencePiece model (wdserve's ids)")
    parser.add_argument("--out", type=Path, required=True, help="output directory (checkpoints; resumes)")
    parser.add_argument("--config", type=Path, help="YAML/JSON file with 'model:' and 'train:' sections")
    parser.add_argument("--name", default="teacher", help="model name stored in the checkpoint")
    parser.add_argument("--source-lang", default="src", help="source language code for the checkpoint")
    parser.add_argument("--target-lang", default="tgt", help="target language code for the checkpoint")
    for name, kind in TRAIN_OVERRIDES.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, help=f"override train.{name}")


def run_train(args: argparse.Namespace) -> None:
    import torch

    from wdserve.distill.batching import encode_pairs
    from wdserve.distill.data import read_parallel
    from wdserve.distill.model import ModelConfig, Transformer
    from wdserve.distill.train import TrainConfig, train
    from wdserve.distill.vocab import Vocab

    config = read_settings(args.config, "train", known=("model", "train"))
    sections = {section: config.get(section) or {} for section in ("model", "train")}
    for section, values in sections.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{args.config}: section '{section}' must be a mapping of settings")
    overrides = {k: getattr(args, k) for k in TRAIN_OVERRIDES if getattr(args, k) is not None}
    vocab = Vocab(args.vocab)
    try:
        model_cfg = ModelConfig.from_dict({**sections["model"], "vocab_size": len(vocab)})
        train_cfg = TrainConfig.from_dict({**sections["train"], **overrides})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{args.config or 'train settings'}: {err}") from err
    train_pairs = read_parallel(args.train_src, args.train_tgt)
    valid_pairs = read_parallel(args.valid_src, args.valid_tgt)

    torch.manual_seed(train_cfg.seed)
    model = Transformer(model_cfg)
    meta = {"name": args.name, "method": "teacher", "source_lang": args.source_lang,
            "target_lang": args.target_lang}
    log.info("training %s on %d pairs (%d dev) into %s", args.name, len(train_pairs), len(valid_pairs),
             args.out)
    result = train(model, vocab, encode_pairs(vocab, train_pairs), valid_pairs, train_cfg, args.out, meta)
    print(json.dumps({"best": str(result.best_path), "last": str(result.last_path),
                      "dev_bleu": result.best_bleu, "steps": result.steps}, indent=2))


# ---------------------------------------------------------------------------------------------------
# wdserve import


def configure_import(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE",
                        help="Hugging Face model id (e.g. Helsinki-NLP/opus-mt-de-en) or a local directory "
                             "holding a saved MarianMTModel and its MarianTokenizer files")
    parser.add_argument("--out", type=Path, required=True,
                        help="directory for checkpoint_best.pt (a teacher checkpoint) and pretrained.json")
    parser.add_argument("--offline", action="store_true",
                        help="never download: a model id must already be in the Hugging Face cache "
                             "(also with HF_HUB_OFFLINE=1)")


def run_import(args: argparse.Namespace) -> None:
    from wdserve.distill.marian import import_marian

    path = import_marian(args.source, args.out, local_files_only=args.offline)
    print(f"teacher checkpoint: {path}")


# ---------------------------------------------------------------------------------------------------
# wdserve evaluate


def configure_evaluate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, metavar="MODEL",
                        help="a checkpoint (.pt) or an exported CTranslate2 directory")
    parser.add_argument("--src", type=Path, required=True, help="source sentences, one per line (.gz ok)")
    parser.add_argument("--ref", type=Path, required=True, help="reference translations, line-aligned")
    parser.add_argument("--beam-size", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32, help="sentences per batch")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--compute-type", default="default",
                        help="CTranslate2 directories only: int8, float32, ... (default: as exported)")
    parser.add_argument("--output", type=Path, default=None, help="write the hypotheses to this file")


def run_evaluate(args: argparse.Namespace) -> None:
    from wdserve.distill.evaluate import evaluate_checkpoint, evaluate_ctranslate2

    if args.beam_size < 1:
        raise ConfigError(f"--beam-size must be at least 1, got {args.beam_size}")
    with _user_errors(OSError, ValueError):  # missing files, foreign checkpoints, misaligned corpora
        if args.model.is_dir():
            result = evaluate_ctranslate2(args.model, args.src, args.ref, beam_size=args.beam_size,
                                          device=args.device, compute_type=args.compute_type,
                                          batch_size=args.batch_size)
        else:
            result = evaluate_checkpoint(args.model, args.src, args.ref, beam_size=args.beam_size,
                                         device=args.device, batch_size=args.batch_size)
        if args.output is not None:
            from wdserve.distill.checkpoint import atomic_save_text

            atomic_save_text("".join(f"{h}\n" for h in result["hypotheses"]), args.output)
    print(f"{args.model}: {result['sentences']} sentences, beam {result['beam_size']}, "
          f"{result['seconds']:.1f} s")
    print(f"BLEU {result['bleu']:6.2f}  {result['bleu_signature']}")
    print(f"chrF {result['chrf']:6.2f}  {result['chrf_signature']}")


# ---------------------------------------------------------------------------------------------------
# wdserve distill


def configure_distill(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", type=Path, required=True, help="teacher checkpoint (.pt)")
    parser.add_argument("--method", required=True, metavar="METHOD",
                        choices=METHODS,
                        help="one of %(choices)s. wd: weight distillation; kd: word-level KD; seqkd: plain "
                             "training (on distilled data with --seqkd); ws / gated-ws: weight squeezing; "
                             "ckd: combinatorial intermediate-layer KD")
    add_corpus_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="output directory (resumes if present)")
    parser.add_argument("--name", default=None, help="student name in the checkpoint (default: --out's name)")
    parser.add_argument("--config", type=Path, default=None, help="YAML/JSON student settings (see above)")
    parser.add_argument("--preset", default=None, metavar="PRESET",
                        choices=PRESETS,
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


def run_distill(args: argparse.Namespace) -> None:
    import torch

    from wdserve.distill.checkpoint import read_checkpoint
    from wdserve.distill.data import read_parallel
    from wdserve.distill.model import ModelConfig
    from wdserve.distill.students import student_config, train_student

    config = read_settings(args.config, "distill", known=DISTILL_KEYS)
    seqkd = config.pop("seqkd", False)
    flags = {"preset": args.preset, "seed": args.seed}
    spec = from_dict(StudentSpec, {**config, **{k: v for k, v in flags.items() if v is not None},
                                   "name": args.name or args.out.name, "method": args.method,
                                   "data": "seqkd" if args.seqkd or seqkd else "bitext"},
                     f"{args.config or 'distill'}")
    if args.max_steps is not None:
        given = [phase for phase in ("phase1", "phase2") if getattr(spec, phase) is not None]
        phases = {phase: {**(getattr(spec, phase) or {}), "max_steps": args.max_steps}
                  for phase in ("train", *given)}
        spec = dataclasses.replace(spec, **phases)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # train_student reports a bad architecture or option as ValueError, after reading the teacher
    with _user_errors(OSError, ValueError, TypeError):
        teacher_config = ModelConfig.from_dict(read_checkpoint(args.teacher)["config"])
        architecture = {**spec.model,
                        **{f: getattr(args, f) for f in ARCHITECTURE_FLAGS if getattr(args, f) is not None}}
        student = student_config(teacher_config, spec.preset, architecture)
        train_pairs = read_parallel(args.train_src, args.train_tgt)
        valid_pairs = read_parallel(args.valid_src, args.valid_tgt)
        if spec.data == "seqkd":
            seqkd = seqkd if isinstance(seqkd, dict) else {}
            train_pairs = distilled_pairs(
                args.teacher, train_pairs, args.out / "seqkd" / "train.tgt",
                beam_size=args.beam_size or seqkd.get("beam_size", 4),
                with_bitext=not args.no_bitext and seqkd.get("with_bitext", True),
                ct2_model_dir=args.ct2_teacher, device=device,
            )
        path = train_student(args.teacher, spec, student, train_pairs, valid_pairs, args.out, device=device)
    print(f"student {spec.name} ({spec.method}): {path}")


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


# ---------------------------------------------------------------------------------------------------
# shared


def read_settings(path: Path | None, command: str, known: Sequence[str]) -> dict[str, Any]:
    """The mapping in a YAML or JSON settings file (``{}`` without one); keys outside ``known`` refused."""
    if path is None:
        return {}
    import yaml  # JSON is YAML, so one parser reads both

    try:
        config = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read {command} config {path}: {err}") from err
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(config).__name__}")
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown}; known: {list(known)}")
    return config


@contextmanager
def _user_errors(*kinds: type[Exception]) -> Iterator[None]:
    """Turns ``kinds`` raised by library code that predates typed errors into a ``WdserveError`` (exit 1)."""
    try:
        yield
    except WdserveError:
        raise
    except kinds as err:
        raise WdserveError(str(err)) from err
