"""`cuma` command line. Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; this file only dispatches, so commands stay thin and testable. A command with its own
sub-commands (``cuma data wvb``) adds a nested subparser in its ``add_arguments`` and dispatches in ``run``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("cuma.demo", "run the main job on the embedded offline defaults"),
    "params": ("cuma.accounting", "count trainable parameters of a method on a base model (meta device)"),
    "plan": ("cuma.planner", "memory and cost plan of a run per GPU, for each ZeRO stage"),
    "data": ("cuma.data.cli", "prepare data sets (wvb, synth, opinions, prism, ca)"),
    "eval": ("cuma.evaluate.cli", "evaluate a model or adapter (wvb, opinions, choice, winrate)"),
    "train": ("cuma.train.cli", "train a method (sft, dpo, grpo) from a YAML config with --key value overrides"),
    "analyze": ("cuma.analyze", "routing topology and mean-collapse analyses"),
    "bench": ("cuma.bench", "benchmark methods on one data set (opinions: LoRA vs CuMA with the reference rows)"),
    "serve": ("cuma.serve.cli", "OpenAI-compatible server for profile-conditioned models, with a playground"),
}

# commands that take free-form `--section.key value` overrides after their own options
ACCEPTS_OVERRIDES = {"train"}
# options that name a command's output folder: checked (creatable, writable; not empty unless --overwrite where the
# command has that flag) before the command starts work, so a bad path fails in a second, not after the work
OUTPUT_OPTIONS = ("out", "work", "prepare")


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
        check_outputs(args)
        return int(mod.run(args) or 0)
    except (ValueError, ImportError, ModelLoadError, EncoderLoadError) as err:
        print(f"cuma {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # FileNotFoundError, PermissionError, NotADirectoryError, a full disk ...: one line
        print(f"cuma {args.command}: error: {os_error_text(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cuma {args.command}: interrupted", file=sys.stderr)
        return 130


def check_outputs(args: argparse.Namespace) -> None:
    """:func:`cuma.runinfo.check_output_folder` for each output option of the parsed command."""
    from .runinfo import check_output_folder

    for name in OUTPUT_OPTIONS:
        value = getattr(args, name, None)
        if isinstance(value, (str, os.PathLike)) and str(value):
            overwrite = getattr(args, "overwrite", None) if name != "work" else None
            check_output_folder(value, f"--{name}", overwrite=overwrite if isinstance(overwrite, bool) else None)


def os_error_text(err: OSError) -> str:
    """An OS error in one line, naming its path(s): "cannot write runs/x (Permission denied)"."""
    paths = [p for p in (getattr(err, "filename", None), getattr(err, "filename2", None)) if p is not None]
    if not paths or not err.strerror:
        return str(err)
    return f"{' -> '.join(str(p) for p in paths)}: {err.strerror}"


if __name__ == "__main__":
    sys.exit(main())
