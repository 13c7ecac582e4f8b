"""Parameter accounting: trainable parameters of a method and their share of the base model.

The base model is built from its config on the meta device, so no weights are read or allocated (an 8B model costs
nothing). ``cuma params --model Qwen/Qwen3-8B --method cuma --profile-dim 1024`` prints one row::

    method  trainable    base           share
    cuma    125,209,152  8,190,735,360  1.53%

The share is trainable parameters / base-model parameters (the base count excludes adapter parameters), which is how
the CuMA paper's table reports it.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch

from . import methods

def load_config(model: Any):
    """A transformers config from an embedded model name (``smollm2-135m``), a hub id, a local model directory, a
    ``config.json`` path, a config object or a config dict with ``model_type``."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model
    if isinstance(model, dict):
        model = dict(model)
        model_type = model.pop("model_type", None)
        if model_type is None:
            raise ValueError("a config dict needs a 'model_type' entry")
        return AutoConfig.for_model(model_type, **model)
    ref = os.fspath(model)
    embedded = _embedded_config(ref)
    if embedded is not None:
        return embedded
    if os.path.isfile(ref):
        from .runinfo import read_json

        data = read_json(ref, dict, what="a transformers config.json")
        if "model_type" not in data:
            raise ValueError(f"{ref} has no 'model_type': not a transformers config.json")
        return load_config(data)
    if os.path.isdir(ref) and not os.path.isfile(os.path.join(ref, "config.json")):
        raise FileNotFoundError(f"{ref} is a directory without a config.json")
    try:
        return AutoConfig.from_pretrained(ref)
    except OSError as err:
        raise FileNotFoundError(
            f"could not read a model config from {ref!r} (a hub id needs the hub or its local cache; a path needs a "
            f"config.json): {err}"
        ) from err


def _embedded_config(name: str):
    """Config of one of the embedded offline models (``smollm2-135m``), from its safetensors cache (made on first
    use by :mod:`cuma.models`), or None when ``name`` is not an embedded model."""
    try:
        from . import models
    except ImportError:  # pragma: no cover - cuma.models is part of the package
        return None
    if models.describe(name).get("kind") != "embedded":
        return None
    from transformers import AutoConfig

    try:
        folder, converted = models.ensure_embedded_cache(name)
    except models.ModelLoadError as err:
        raise FileNotFoundError(str(err)) from err
    if folder is not None:
        return AutoConfig.from_pretrained(folder)
    return converted[0].config


def meta_model(model: Any):
    """The causal LM of ``model`` (hub id, directory, config.json, config object) on the meta device: shapes only."""
    from transformers import AutoModelForCausalLM

    config = load_config(model)
    config = config.__class__.from_dict(config.to_dict())  # a private copy
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def count_parameters(model: Any, method: str, **options) -> dict[str, Any]:
    """Build ``method`` on the meta-device base model of ``model`` and count its parameters.

    Returns ``{"method", "model", "trainable", "base", "total", "share", "percent", "options"}``: ``share`` is
    trainable / base (base excludes the adapter's parameters), ``percent`` is 100 * share.
    """
    methods.get_spec(method)  # unknown method -> ValueError before building anything
    base = meta_model(model)
    name = getattr(base.config, "_name_or_path", "") or type(base).__name__
    built = methods.build(method, base, **options)
    return {
        "method": method,
        "model": name if not isinstance(model, (str, os.PathLike)) else os.fspath(model),
        "trainable": built.trainable_parameters,
        "base": built.base_parameters,
        "total": built.total_parameters,
        "share": built.trainable_share,
        "percent": 100.0 * built.trainable_share,
        "options": methods._jsonable(built.options),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ("method", "trainable", "base", "share")
    body = [(r["method"], f"{r['trainable']:,}", f"{r['base']:,}", f"{r['percent']:.2f}%") for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    lines = []
    for i, row in enumerate([header, *body]):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# CLI: cuma params

# (flag, option name, argparse type); only the flags given on the command line are passed to the method
_FLAGS = [
    ("--r", "r", int),
    ("--lora-alpha", "lora_alpha", int),
    ("--lora-dropout", "lora_dropout", float),
    ("--num-experts", "num_experts", int),
    ("--top-k", "top_k", int),
    ("--profile-dim", "profile_dim", int),
    ("--router-hidden", "router_hidden", int),
    ("--target-modules", "target_modules", str),
    ("--num-virtual-tokens", "num_virtual_tokens", int),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="base model: embedded name (smollm2-135m), hub id, local model directory or config.json",
    )
    parser.add_argument(
        "--method",
        required=True,
        action="append",
        help=f"method name (repeatable): {', '.join(methods.list_methods())}",
    )
    for flag, dest, typ in _FLAGS:
        parser.add_argument(flag, dest=f"opt_{dest}", type=typ, default=None, help=f"method option {dest}")
    parser.add_argument(
        "--option",
        "-o",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other method option, e.g. -o shared_A=true -o router_layers=1",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for _, dest, _ in _FLAGS:
        value = getattr(args, f"opt_{dest}", None)
        if value is not None:
            options[dest] = value
    for item in args.option or []:
        if "=" not in item:
            raise ValueError(f"--option expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        options[key.strip().replace("-", "_")] = value.strip()
    return options


def run(args: argparse.Namespace) -> int:
    options = _options_from_args(args)
    rows = [count_parameters(args.model, m, **options) for m in args.method]
    if args.json:
        print(json.dumps(rows if len(rows) > 1 else rows[0], indent=2))
    else:
        print(f"base model: {args.model}")
        print(format_table(rows))
    return 0


__all__ = ["count_parameters", "format_table", "load_config", "meta_model", "add_arguments", "run"]
