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
    "plan": ("cuma.planner", "memory and cost plan of a run per GPU, for each ZeRO stage"),
    "data": ("cuma.data.cli", "prepare data sets (wvb, synth)"),
    "eval": ("cuma.evaluate.cli", "evaluate a model or adapter (wvb)"),
    "train": ("cuma.train.cli", "train a method (sft) from a YAML config with --key value overrides"),
    "analyze": ("cuma.analyze", "routing topology and mean-collapse analyses"),
    "bench": ("cuma.bench", "benchmark methods on one data set (opinions: LoRA vs CuMA with the reference rows)"),
    "serve": ("cuma.serve.cli", "OpenAI-compatible server for profile-conditioned models, with a playground"),
}

# commands that take free-form `--section.key value` overrides after their own options
ACCEPTS_OVERRIDES = {"train"}


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
    from .encoder import EncoderLoadError
    from .models import ModelLoadError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ACCEPTS_OVERRIDES:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    mod = importlib.import_module(args._module)
    try:
        return int(mod.run(args) or 0)
    except (ValueError, FileNotFoundError, ImportError, ModelLoadError, EncoderLoadError) as err:
        print(f"cuma {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
