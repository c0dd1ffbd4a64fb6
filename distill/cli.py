"""``wdserve data`` and ``wdserve evaluate`` (``train`` and ``distill`` have their own modules).

PyTorch and CTranslate2 are imported inside ``run_*`` so that building the
command-line parser stays light.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


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
                    "data.dir at an existing copy instead, e.g. ../shared/data/multi30k.",
    )
    multi30k.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    multi30k.add_argument("--base-url", default=MULTI30K_URL,
                          help="where the files are (default: %(default)s)")
    multi30k.add_argument("--timeout", type=float, default=60.0, help="seconds per request")


def run_data(args: argparse.Namespace) -> int:
    from wdserve.distill.data import DataError

    try:
        if args.source == "synthetic":
            from wdserve.distill.synthetic import write_synthetic

            sizes = {"train": args.train, "valid": args.valid, "test": args.test}
            if any(n < 1 for n in sizes.values()):
                return _fail("data", f"every split needs at least one pair, got {sizes}")
            write_synthetic(args.out_dir, sizes=sizes, seed=args.seed)
            print(f"wrote {', '.join(f'{n} {split}' for split, n in sizes.items())} pairs to {args.out_dir}")
        else:
            from wdserve.distill.data import download_multi30k

            paths = download_multi30k(args.out_dir, base_url=args.base_url, timeout=args.timeout)
            print(f"Multi30k: {len(paths)} files in {args.out_dir}")
    except (DataError, OSError) as err:
        return _fail("data", err)
    return 0


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


def run_evaluate(args: argparse.Namespace) -> int:
    from wdserve.distill.evaluate import evaluate_checkpoint, evaluate_ctranslate2

    if args.beam_size < 1:
        return _fail("evaluate", f"--beam-size must be at least 1, got {args.beam_size}")
    try:
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
    except (OSError, ValueError) as err:  # missing files, foreign checkpoints, misaligned corpora
        return _fail("evaluate", err)
    print(f"{args.model}: {result['sentences']} sentences, beam {result['beam_size']}, "
          f"{result['seconds']:.1f} s")
    print(f"BLEU {result['bleu']:6.2f}  {result['bleu_signature']}")
    print(f"chrF {result['chrf']:6.2f}  {result['chrf_signature']}")
    return 0


def _fail(command: str, message: object) -> int:
    print(f"wdserve {command}: error: {message}", file=sys.stderr)
    return 1
