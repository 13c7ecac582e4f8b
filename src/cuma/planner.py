"""Memory and cost plan of a training run, per GPU, for each ZeRO stage, with and without gradient checkpointing.

    cuma plan --model Qwen/Qwen3-8B --method cuma --r 64 --profile-dim 1024 --seq-len 1024 --batch 16 --gpus 8 --zero 2

The model (hub id, local folder or config.json) is built on the meta device (:func:`cuma.accounting.meta_model`), the
method is built on it, and the parameter counts come from that model. The memory formulas are in
``docs/scaling.md``; in short, with P frozen base parameters, T trainable parameters, N_d GPUs, bf16 weights and
mixed-precision AdamW (ZeRO paper's accounting: 2 + 2 + 12 bytes per trainable parameter):

    weights     2 P + 2 T            (ZeRO-3: / N_d)
    gradients   2 T                  (ZeRO-2, 3: / N_d)
    optimizer   12 T (fp32 master, m, v)   (ZeRO-1, 2, 3: / N_d)
    activations per GPU, micro-batch b, sequence s (bf16):
        per layer A = 2 s b (4h + 2q + 2kv [+ q + kv with q/k-norm] + 4i + a)
        no checkpointing:  L A + logits;   checkpointing:  2 s b h L + A + logits;   logits = 6 s b V
    where a is the adapters' saved activations per token and layer (CuMA: 2 N r + 2 router_hidden + 4 N per adapted
    projection; LoRA: r).

Cost: training FLOPs per token = forward 2(P+T) + 2 s q L (causal attention) + backward 2(P+T) + 2T + 4 s q L
(+ one more forward with checkpointing), and the bytes each GPU sends per optimizer step (gradient all-reduce, or
reduce-scatter + all-gather; ZeRO-3 also all-gathers the weights for every forward and backward).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

from torch import nn

GIB = 1024**3


@dataclass(frozen=True)
class Shape:
    """What the activation formula needs of the base model."""

    layers: int
    hidden: int
    intermediate: int
    q_dim: int  # heads * head_dim
    kv_dim: int  # kv_heads * head_dim
    vocab: int
    qk_norm: bool


@dataclass(frozen=True)
class Counts:
    base: int  # P: frozen parameters of the base model
    trainable: int  # T
    adapter_act_per_token: int  # a summed over all layers (elements per token)


@dataclass(frozen=True)
class Setting:
    seq_len: int
    micro_batch: int  # per GPU
    gpus: int
    bytes_param: int = 2  # bf16 weights and gradients
    bytes_optim: int = 12  # fp32 master + Adam m + v


def model_shape(config) -> Shape:
    text = getattr(config, "get_text_config", lambda: config)()
    h = int(text.hidden_size)
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or h // heads)
    kv = int(getattr(text, "num_key_value_heads", None) or heads)
    qk_norm = str(getattr(text, "model_type", "")).startswith("qwen3")
    return Shape(
        layers=int(text.num_hidden_layers),
        hidden=h,
        intermediate=int(text.intermediate_size),
        q_dim=heads * head_dim,
        kv_dim=kv * head_dim,
        vocab=int(text.vocab_size),
        qk_norm=qk_norm,
    )


def adapter_activations(model: nn.Module) -> int:
    """Elements per token the adapters save for backward, summed over every adapted projection of ``model``."""
    from .tuners.cuma.layer import CuMALayer

    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover
        LoraLayer = ()  # type: ignore[assignment]
    total = 0
    for module in model.modules():
        if isinstance(module, CuMALayer):
            for name, cfg in module.cuma_settings.items():
                n, r = cfg.num_experts, cfg.r
                total += 2 * n * r + 4 * n  # x @ A_cat and its gated copy; fp32 probs and gates (2 bf16 each)
                if name in module.cuma_router:
                    total += 2 * cfg.router_hidden * (cfg.router_layers - 1)  # hidden pre- and post-ReLU
        elif LoraLayer and isinstance(module, LoraLayer):
            total += sum(int(r) for r in module.r.values())
    return total


def activation_bytes(shape: Shape, counts: Counts, st: Setting, checkpointing: bool) -> dict[str, int]:
    """Activation memory per GPU: the per-layer figure, the layers' total and the logits."""
    s, b = st.seq_len, st.micro_batch
    per_token_layer = 4 * shape.hidden + 2 * shape.q_dim + 2 * shape.kv_dim + 4 * shape.intermediate
    if shape.qk_norm:
        per_token_layer += shape.q_dim + shape.kv_dim
    adapters = counts.adapter_act_per_token / shape.layers
    layer = int(round(st.bytes_param * s * b * (per_token_layer + adapters)))
    logits = 6 * s * b * shape.vocab  # bf16 logits + their fp32 copy for the cross-entropy
    if checkpointing:
        layers = st.bytes_param * s * b * shape.hidden * shape.layers + layer
    else:
        layers = shape.layers * layer
    return {"per_layer": layer, "layers": int(layers), "logits": logits, "total": int(layers) + logits}


def state_bytes(counts: Counts, st: Setting, stage: int) -> dict[str, float]:
    """Weights, gradients and optimizer state per GPU under ZeRO ``stage`` (0 = plain DDP)."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage}")
    n = st.gpus
    p, t = counts.base, counts.trainable
    weights = st.bytes_param * (p + t) / (n if stage >= 3 else 1)
    grads = st.bytes_param * t / (n if stage >= 2 else 1)
    optim = st.bytes_optim * t / (n if stage >= 1 else 1)
    return {"weights": weights, "gradients": grads, "optimizer": optim}


def cost(shape: Shape, counts: Counts, st: Setting, stage: int, checkpointing: bool, global_batch: int) -> dict:
    """FLOPs per token and per optimizer step, and bytes each GPU sends per optimizer step."""
    p, t = counts.base, counts.trainable
    s = st.seq_len
    attn = 2 * s * shape.q_dim * shape.layers  # causal QK^T + AV, forward, per token (2 matmuls x 2 FLOPs / 2)
    forward = 2 * (p + t) + attn
    backward = 2 * (p + t) + 2 * t + 2 * attn  # input grads through every weight, weight grads of T only
    per_token = forward + backward + (forward if checkpointing else 0)
    tokens = global_batch * s
    ring = 2 * (st.gpus - 1) / st.gpus if st.gpus > 1 else 0.0
    # gradient all-reduce (stage 0/1) == reduce-scatter + all-gather of the updated shard (stage 2/3), in volume
    comm = ring * st.bytes_param * t
    if stage == 3:
        gathers = 3 if checkpointing else 2  # weights all-gathered for forward, backward (and recompute)
        comm += gathers * ring / 2 * st.bytes_param * (p + t)
    return {
        "flops_per_token": per_token,
        "tokens_per_step": tokens,
        "flops_per_step": per_token * tokens,
        "comm_bytes_per_gpu_per_step": comm,
    }


def plan(
    model: Any,
    method: str,
    *,
    seq_len: int,
    batch: int,
    gpus: int,
    micro_batch: Optional[int] = None,
    options: Optional[dict] = None,
) -> dict[str, Any]:
    """The full plan: counts, and one row per (ZeRO stage, checkpointing). ``batch`` is the global batch per
    optimizer step; ``micro_batch`` (per GPU) defaults to ``batch / gpus`` (gradient accumulation makes up the rest)."""
    from . import accounting, methods

    if gpus < 1 or batch < 1 or seq_len < 1:
        raise ValueError("--gpus, --batch and --seq-len must be >= 1")
    if micro_batch is None:
        if batch % gpus:
            raise ValueError(f"--batch {batch} is not a multiple of --gpus {gpus}; give --micro-batch")
        micro_batch = batch // gpus
    if batch % (micro_batch * gpus):
        raise ValueError(f"--batch {batch} is not a multiple of micro-batch {micro_batch} x {gpus} GPUs")
    methods.get_spec(method)
    base = accounting.meta_model(model)
    shape = model_shape(base.config)
    built = methods.build(method, base, **(options or {}))
    counts = Counts(
        base=built.base_parameters,
        trainable=built.trainable_parameters,
        adapter_act_per_token=adapter_activations(built.model),
    )
    st = Setting(seq_len=seq_len, micro_batch=micro_batch, gpus=gpus)
    rows = []
    for ckpt in (False, True):
        if ckpt and not built.gradient_checkpointing_allowed:
            continue
        act = activation_bytes(shape, counts, st, ckpt)
        for stage in (0, 1, 2, 3):
            mem = state_bytes(counts, st, stage)
            rows.append({
                "zero": stage,
                "checkpointing": ckpt,
                **mem,
                "activations": act["total"],
                "activations_per_layer": act["per_layer"],
                "logits": act["logits"],
                "total": sum(mem.values()) + act["total"],
                **cost(shape, counts, st, stage, ckpt, batch),
            })
    return {
        "model": str(model),
        "method": method,
        "options": methods._jsonable(built.options),
        "shape": asdict(shape),
        "parameters": counts.base,
        "trainable": counts.trainable,
        "trainable_percent": 100.0 * built.trainable_share,
        "adapter_activations_per_token": counts.adapter_act_per_token,
        "seq_len": seq_len,
        "global_batch": batch,
        "micro_batch": micro_batch,
        "gradient_accumulation": batch // (micro_batch * gpus),
        "gpus": gpus,
        "rows": rows,
    }


def _gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def format_plan(result: dict[str, Any], zero: Optional[int] = None) -> str:
    lines = [
        f"model {result['model']}  method {result['method']}",
        f"parameters {result['parameters']:,}  trainable {result['trainable']:,} ({result['trainable_percent']:.2f}%)",
        f"seq_len {result['seq_len']}  global batch {result['global_batch']} = micro-batch {result['micro_batch']} x "
        f"{result['gpus']} GPUs x {result['gradient_accumulation']} accumulation",
        "memory per GPU in GiB (bf16 weights, mixed-precision AdamW; formulas: docs/scaling.md)",
    ]
    header = ("zero", "ckpt", "weights", "grads", "optim", "activ", "total", "TFLOP/step", "comm GiB/step")
    body = []
    for r in result["rows"]:
        mark = "*" if zero is not None and r["zero"] == zero else ""
        body.append((
            f"{r['zero']}{mark}", "on" if r["checkpointing"] else "off", _gib(r["weights"]), _gib(r["gradients"]),
            _gib(r["optimizer"]), _gib(r["activations"]), _gib(r["total"]), f"{r['flops_per_step'] / 1e12:,.0f}",
            _gib(r["comm_bytes_per_gpu_per_step"]),
        ))
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    for row in [header, *body]:
        lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    if zero is not None:
        lines.append(f"* the requested --zero {zero}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CLI: cuma plan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from . import accounting

    parser.add_argument("--model", required=True, help="hub id, local model folder, config.json or smollm2-135m")
    parser.add_argument("--method", default="cuma", help="method name (default cuma)")
    for flag, dest, typ in accounting._FLAGS:
        parser.add_argument(flag, dest=f"opt_{dest}", type=typ, default=None, help=f"method option {dest}")
    parser.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                        help="any other method option")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default 1024)")
    parser.add_argument("--batch", type=int, default=16, help="global batch per optimizer step (default 16)")
    parser.add_argument("--micro-batch", type=int, default=None, help="per-GPU micro-batch (default batch / gpus)")
    parser.add_argument("--gpus", type=int, default=8, help="number of GPUs (default 8)")
    parser.add_argument("--zero", type=int, default=None, choices=(0, 1, 2, 3), help="mark this ZeRO stage")
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    from . import accounting

    options = accounting._options_from_args(args)
    result = plan(args.model, args.method, seq_len=args.seq_len, batch=args.batch, gpus=args.gpus,
                  micro_batch=args.micro_batch, options=options)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_plan(result, args.zero))
    return 0


__all__ = ["plan", "format_plan", "activation_bytes", "state_bytes", "cost", "model_shape", "add_arguments", "run"]
