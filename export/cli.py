"""``wdserve export CKPT OUT``: checkpoint to CTranslate2 directories, optionally verified.

Heavy imports (PyTorch, CTranslate2) happen inside ``run_export`` so ``wdserve --help``
stays light; the quantization list belongs to ``export.convert`` and is read from it when
argparse needs it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from wdserve.artifacts import QUANTIZATIONS
from wdserve.errors import ConfigError, WdserveError


def configure_export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path,
                        help="a wdserve checkpoint (e.g. models/student/checkpoint_best.pt)")
    parser.add_argument("out", type=Path,
                        help="output directory; with several quantizations, OUT/<name>-<quantization>/ each")
    parser.add_argument("--quantization", "-q", nargs="+", default=["float32"], metavar="Q",
                        choices=QUANTIZATIONS,
                        help="one or more of %(choices)s (default: float32)")
    parser.add_argument("--name", help="model name (default: the checkpoint's meta name, else its file stem)")
    parser.add_argument("--force", action="store_true", help="replace existing non-empty output directories")
    parser.add_argument("--verify", action="store_true",
                        help="compare each export with the PyTorch checkpoint (needs --verify-src)")
    parser.add_argument("--verify-src", type=Path, metavar="FILE",
                        help="source sentences for --verify, one per line")
    parser.add_argument("--verify-n", type=int, default=100, metavar="N",
                        help="use the first N lines of --verify-src (default: 100)")
    parser.add_argument("--device", default="cpu", help="device for --verify (cpu or cuda)")
    parser.add_argument("--report", type=Path, metavar="FILE", help="write the verification result as JSON")


def run_export(args: argparse.Namespace) -> None:
    if args.verify and args.verify_src is None:
        raise ConfigError("--verify needs --verify-src FILE (source sentences, one per line)")
    if args.verify_n < 1:
        raise ConfigError("--verify-n must be at least 1")

    from wdserve.export.convert import export_all

    dirs = export_all(args.checkpoint, args.out, args.quantization, name=args.name, force=args.force)
    for quantization, path in dirs.items():
        print(f"{quantization:>12}  {path}")
    if not args.verify:
        return

    from wdserve.export.verify import verify_export

    try:
        lines = args.verify_src.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise ConfigError(f"cannot read --verify-src: {err}") from err
    sentences = [line for line in lines if line.strip()][: args.verify_n]
    if not sentences:
        raise ConfigError(f"{args.verify_src} has no non-empty lines")
    result = verify_export(args.checkpoint, dirs, sentences, device=args.device)
    print(format_verification(result))
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if result["float32_parity"] is False:
        raise WdserveError(f"the float32 export does not reproduce {args.checkpoint} "
                           f"(tolerance {result['float32_tolerance']:g}; see the table above)")


def format_verification(result: dict) -> str:
    """A short table: one row per exported variant."""
    header = f"{'variant':<14}{'status':<22}{'greedy identical':>18}{'max |dlogp|':>14}{'BLEU vs fp32':>14}"
    rows = [f"verified on {result['sentences']} sentences ({result['device']})", header]
    for label, entry in result["variants"].items():
        if entry["status"] != "ok":
            rows.append(f"{label:<14}{entry['status']:<22}")
            continue
        identical = f"{entry['identical_sentences']}/{result['sentences']}"
        bleu = entry.get("bleu_vs_float32")
        rows.append(f"{label:<14}{'ok':<22}{identical:>18}{entry['max_logprob_diff']:>14.2e}"
                    f"{'-' if bleu is None else f'{bleu:.2f}':>14}")
    parity = result["float32_parity"]
    if parity is not None:
        rows.append(f"float32 parity (identical tokens, |dlogp| < {result['float32_tolerance']:g}): "
                    + ("PASS" if parity else "FAIL"))
    return "\n".join(rows)
