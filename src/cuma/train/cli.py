"""`cuma train sft --config FILE [--section.key value ...]`."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="train_command", metavar="STAGE")
    sub.required = True
    sft = sub.add_parser(
        "sft",
        help="conditional SFT of any registry method",
        description="Conditional SFT. Any config field can be overridden: --train.learning_rate 1e-4, "
        "--method.options.r 64, or a unique leaf name alone (--learning_rate 1e-4). A CuMA method whose config does "
        "not set method.options.conditioning trains the fast router (conditioning: fast, routers at 3x the learning "
        "rate unless train.router_learning_rate is set); conditioning: paper is the paper's router.",
    )
    sft.add_argument("--config", help="YAML config (configs/wvb/*.yaml); defaults apply when omitted")
    sft.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    sft.add_argument("--method-options", metavar="METHOD",
                     help="print the options of METHOD (type, default, what it does) and exit")
    for name, text in (
        ("dpo", "conditional DPO from a `cuma train sft` output (reference = the SFT policy)"),
        ("grpo", "conditional GRPO from a `cuma train sft` output, rewarded by the profile-aware judge"),
    ):
        stage = sub.add_parser(name, help=text, description=f"{text[0].upper()}{text[1:]}. Any config field can be "
                               "overridden: --init.sft_path runs/sft, --train.learning_rate 5e-6.")
        stage.add_argument("--config", help="YAML config (configs/prism/*.yaml, configs/ca/*.yaml)")
        stage.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


# what `cuma train sft` trains a CuMA method with where its config leaves the router unset (the library's default,
# CuMAConfig / methods.build, stays the paper's router); chosen on two populations' valid splits and on real survey
# answers: docs/notes/conditioning-default.md
SFT_DEFAULT_CONDITIONING = "fast"


def apply_sft_defaults(cfg) -> dict:
    """Fill in what ``cuma train sft`` chooses where ``cfg`` (an SFTRunConfig) leaves it unset: a CuMA method gets
    ``conditioning=SFT_DEFAULT_CONDITIONING``, and a run with ``conditioning="fast"`` gets its routers at
    ``FAST_ROUTER_LR_RATIO`` x ``train.learning_rate`` unless ``train.router_learning_rate`` is given. Returns what it
    set (dotted config keys -> values), which the CLI prints; the run records the resolved config."""
    from .. import methods
    from ..tuners.cuma.config import FAST_ROUTER_LR_RATIO

    spec = methods.get_spec(cfg.method.name)
    if "conditioning" not in spec.options:
        return {}
    applied = {}
    if cfg.method.options.get("conditioning") is None:
        cfg.method.options["conditioning"] = applied["method.options.conditioning"] = SFT_DEFAULT_CONDITIONING
    if cfg.method.options["conditioning"] == "fast" and cfg.train.router_learning_rate is None:
        cfg.train.router_learning_rate = float(f"{FAST_ROUTER_LR_RATIO * cfg.train.learning_rate:.6g}")
        applied["train.router_learning_rate"] = cfg.train.router_learning_rate
    return applied


def run(args: argparse.Namespace) -> int:
    from ..config import dump_yaml, load_config

    if args.train_command == "sft":
        from .config import SFTRunConfig

        if args.method_options:
            from ..methods.describe import options_text

            print(options_text(args.method_options))
            return 0
        cfg = load_config(SFTRunConfig, args.config, args.overrides)
        applied = apply_sft_defaults(cfg)
        if args.print_config:
            print(dump_yaml(cfg), end="")
            return 0
        from .sft import run_sft

        if applied:
            print("cuma train sft defaults: " + ", ".join(f"{k}={v!r}" for k, v in applied.items())
                  + " (set them in the config to choose otherwise; conditioning: paper is the paper's router)")
        run = run_sft(cfg)
        print(
            f"trained {run['method']['method']} for {run['global_step']} steps in {run['train_seconds']:.1f} s "
            f"(train loss {run['train_loss']:.4f}{_covers(run)}); saved to {cfg.train.output_dir}"
        )
        return 0
    if args.train_command in ("dpo", "grpo"):
        from . import config as configs

        cls = configs.DPORunConfig if args.train_command == "dpo" else configs.GRPORunConfig
        cfg = load_config(cls, args.config, args.overrides)
        if args.print_config:
            print(dump_yaml(cfg), end="")
            return 0
        if args.train_command == "dpo":
            from .dpo import run_dpo as runner
        else:
            from .grpo import run_grpo as runner
        run = runner(cfg)
        print(
            f"{args.train_command}: trained {run['method']['method']} for {run['global_step']} steps in "
            f"{run['train_seconds']:.1f} s (train loss {run['train_loss']:.4f}{_covers(run)}); saved to "
            f"{cfg.train.output_dir}"
        )
        return 0
    raise ValueError(f"unknown train stage {args.train_command!r}")


def _covers(run: dict) -> str:
    """After a resume, which steps the reported loss is the mean of."""
    return f" over {run['train_loss_covers']}" if run.get("resumed_from") else ""
