"""The ``wdserve`` command line.

Each stage has one command-line module beside the code it drives, exposing
``configure_<name>(parser)`` and ``run_<name>(args)`` for each of its subcommands.
Building the parser imports no PyTorch or CTranslate2, and a subcommand's heavy
modules are imported only when it runs, so ``wdserve serve`` on a serving install
never imports PyTorch.

``run_<name>`` returns on success and raises on failure. A ``WdserveError`` becomes
one line, ``wdserve <command>: error: <message>``, and its exit code (2 for a bad
command line or config file, 1 otherwise; see ``wdserve.errors``); any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from wdserve.errors import WdserveError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "pipeline": ("wdserve.pipeline", "run every stage of a pipeline config (data to report)"),
    "data": ("wdserve.distill.cli", "write a synthetic corpus, or download Multi30k"),
    "train": ("wdserve.distill.cli", "train a model on a parallel corpus"),
    "import": ("wdserve.distill.cli", "import a pretrained Marian / OPUS-MT teacher (Hugging Face format)"),
    "evaluate": ("wdserve.distill.cli", "score a checkpoint or CTranslate2 model with sacreBLEU"),
    "distill": ("wdserve.distill.cli", "train one student from a teacher checkpoint"),
    "export": ("wdserve.export.cli", "convert a checkpoint to CTranslate2 and verify it"),
    "serve": ("wdserve.server.cli", "serve CTranslate2 models over HTTP"),
    "bench": ("wdserve.loadtest.cli", "load-test teacher against students and write a report"),
    "soak": ("wdserve.loadtest.soak", "hold a server at half load for a long time, with clients that leave, "
                                      "dawdle or send garbage; report its memory and descriptors"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wdserve",
        description="Distill translation students from a teacher, export them to CTranslate2, "
                    "serve them side by side and load-test them.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=help_text)
        getattr(module, f"configure_{name}")(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        getattr(module, f"run_{args.command}")(args)
    except WdserveError as err:
        print(f"wdserve {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
