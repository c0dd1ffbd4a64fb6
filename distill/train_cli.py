"""``wdserve train``: a teacher from scratch on a parallel corpus.

    wdserve train --train-src train.de --train-tgt train.en --valid-src val.de --valid-tgt val.en \\
        --vocab spm.model --out models/teacher --config teacher.yaml --max-steps 20000

``--config`` is YAML or JSON with two optional sections, ``model:`` (ModelConfig
fields, vocab_size comes from the vocabulary) and ``train:`` (TrainConfig fields);
flags override the file. Rerunning the same command resumes from ``--out``.
No PyTorch import at module level: ``wdserve --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# flag -> TrainConfig field, for the settings people change most between runs
TRAIN_OVERRIDES = {"max_steps": int, "max_tokens": int, "lr": float, "warmup_steps": int,
                   "eval_every": int, "seed": int, "device": str}


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


def read_config(path: Path | None) -> dict[str, dict[str, Any]]:
    """``{"model": {...}, "train": {...}}`` from a YAML or JSON file (both may be absent)."""
    if path is None:
        return {"model": {}, "train": {}}
    import yaml  # JSON is YAML, so one parser reads both

    try:
        config = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise SystemExit(f"cannot read train config {path}: {err}") from err
    if not isinstance(config, dict) or set(config) - {"model", "train"}:
        raise SystemExit(f"{path}: expected a mapping with sections 'model' and/or 'train', got "
                         f"{sorted(config) if isinstance(config, dict) else type(config).__name__}")
    sections = {}
    for section in ("model", "train"):
        values = config.get(section) or {}
        if not isinstance(values, dict):
            raise SystemExit(f"{path}: section '{section}' must be a mapping of settings")
        sections[section] = values
    return sections


def run_train(args: argparse.Namespace) -> int:
    import torch

    from wdserve.distill.batching import encode_pairs
    from wdserve.distill.data import DataError, read_parallel
    from wdserve.distill.model import ModelConfig, Transformer
    from wdserve.distill.train import TrainConfig, train
    from wdserve.distill.vocab import Vocab

    config = read_config(args.config)
    overrides = {k: getattr(args, k) for k in TRAIN_OVERRIDES if getattr(args, k) is not None}
    vocab = Vocab(args.vocab)
    try:
        model_cfg = ModelConfig.from_dict({**config["model"], "vocab_size": len(vocab)})
        train_cfg = TrainConfig.from_dict({**config["train"], **overrides})
    except (TypeError, ValueError) as err:
        raise SystemExit(f"{args.config or 'train settings'}: {err}") from err
    try:
        train_pairs = read_parallel(args.train_src, args.train_tgt)
        valid_pairs = read_parallel(args.valid_src, args.valid_tgt)
    except DataError as err:
        raise SystemExit(str(err)) from err

    torch.manual_seed(train_cfg.seed)
    model = Transformer(model_cfg)
    meta = {"name": args.name, "method": "teacher", "source_lang": args.source_lang,
            "target_lang": args.target_lang}
    log.info("training %s on %d pairs (%d dev) into %s", args.name, len(train_pairs), len(valid_pairs),
             args.out)
    result = train(model, vocab, encode_pairs(vocab, train_pairs), valid_pairs, train_cfg, args.out, meta)
    print(json.dumps({"best": str(result.best_path), "last": str(result.last_path),
                      "dev_bleu": result.best_bleu, "steps": result.steps}, indent=2))
    return 0
