"""`cuma` command line. Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; this file only dispatches, so commands stay thin and testable. A command with its own
sub-commands (``cuma data wvb``) adds a nested subparser in its ``add_arguments`` and dispatches in ``run``."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("cuma.demo", "run the main job on the embedded offline defaults"),
    "params": ("cuma.accounting", "count trainable parameters of a method on a base model (meta device)"),
    "data": ("cuma.data.cli", "prepare data sets (wvb, synth)"),
    "eval": ("cuma.evaluate.cli", "evaluate a model or adapter (wvb)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cuma", description="CuMA: demographic-aware mixture of LoRA experts")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    mod = importlib.import_module(args._module)
    try:
        return int(mod.run(args) or 0)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"cuma {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
