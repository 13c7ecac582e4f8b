"""`cuma demo` command line: flags onto a :class:`~cuma.demo.config.DemoConfig`, then :func:`~cuma.demo.run_demo`."""

from __future__ import annotations

import argparse

from .config import DemoConfig
from .recipe import run_demo

__all__ = ["add_arguments", "config_from_args", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    parser.add_argument("--quick", action="store_true", help="smoke version (~2 minutes): tiny data, 3 steps")
    parser.add_argument("--out", default=d.out, help="report folder (default: report)")
    parser.add_argument("--work", default=d.work, help="folder for data, adapters and evaluations")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the population, the split and training")
    parser.add_argument("--steps", type=int, default=None, help=f"training steps per method (default {d.steps})")
    parser.add_argument("--batch-size", type=int, default=None, help=f"default {d.batch_size}")
    parser.add_argument("--learning-rate", type=float, default=None, help=f"default {d.learning_rate}")
    parser.add_argument("--method-learning-rate", action="append", default=None, metavar="METHOD=LR",
                        help="learning rate of one method (repeatable), e.g. lora=5e-4; --learning-rate sets the rest "
                        f"(default {d.method_learning_rates or 'none'})")
    parser.add_argument("--lr-scheduler", choices=("constant", "linear", "cosine"), default=None,
                        help=f"learning-rate schedule over the steps (default {d.lr_scheduler})")
    parser.add_argument("--router-learning-rate", type=float, default=None,
                        help=f"learning rate of the routers of both CuMA variants (default {d.router_learning_rate:g}; "
                        "pass the main learning rate for no split)")
    parser.add_argument("--loraplus-lr-ratio", type=float, default=None,
                        help="LoRA+: every method's B matrices learn at this multiple of its learning rate (default: "
                        "off, the same lr as A)")
    parser.add_argument("--conditioning", choices=("fast", "paper"), default=None,
                        help="CuMA's router: 'fast' (balanced router inputs, profile-led initial routing, profile input "
                        "centred on the training profiles; the default) or 'paper' (the paper's raw concat(h_t, e_d))")
    parser.add_argument("--split-by-length", type=int, default=None,
                        help=f"run every training batch as this many micro-batches of similar length (default "
                        f"{d.split_by_length}; 1: whole batches)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default=None,
                        help=f"the frozen base's precision for every method (default {d.dtype}; auto: bfloat16 where "
                        "the CPU / GPU has native bf16, else float32; adapter weights stay float32)")
    parser.add_argument("--train-pairs", type=int, default=None, help=f"default {d.train_pairs}")
    parser.add_argument("--test-pairs", type=int, default=None, help=f"seen-country test pairs (default {d.test_pairs})")
    parser.add_argument("--held-out-test-pairs", type=int, default=None,
                        help=f"held-out-country test pairs (default {d.held_out_test_pairs})")


def run(args: argparse.Namespace) -> int:
    run_demo(config_from_args(args))
    return 0


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """The :class:`DemoConfig` of a parsed `cuma demo` command line; a bad value is a ValueError naming the flag."""
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    cfg = DemoConfig(out=args.out, work=args.work, seed=args.seed)
    if args.quick:
        cfg = cfg.quick_version()
    for name in ("steps", "batch_size", "learning_rate", "router_learning_rate", "loraplus_lr_ratio", "split_by_length",
                 "train_pairs", "test_pairs", "held_out_test_pairs"):
        value = getattr(args, name)
        if value is not None:
            if value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
            setattr(cfg, name, value)
    if args.conditioning is not None:
        cfg.conditioning = args.conditioning
    if args.dtype is not None:
        cfg.dtype = args.dtype
    if args.learning_rate is not None and args.method_learning_rate is None:
        cfg.method_learning_rates = {}  # one learning rate for every method
    for item in args.method_learning_rate or ():
        cfg.method_learning_rates = {**cfg.method_learning_rates, **_method_lr(item, cfg.methods)}
    if args.lr_scheduler is not None:
        cfg.lr_scheduler = args.lr_scheduler
    return cfg


def _method_lr(item: str, methods: list[str]) -> dict:
    name, sep, value = item.partition("=")
    if not sep or name not in methods:
        raise ValueError(f"--method-learning-rate must be METHOD=LR with METHOD one of {methods}, got {item!r}")
    try:
        lr = float(value)
    except ValueError:
        lr = -1.0
    if not lr > 0:
        raise ValueError(f"--method-learning-rate {name}: the learning rate must be a positive number, got {value!r}")
    return {name: lr}
