"""Forward+backward of ONE adapted Linear (frozen base Linear included): CuMA vs PEFT LoRA, fp32 on CPU.

    python benchmarks/bench_layer.py [--quick] [--json PATH] [--dims 576 4096] [--build direct|peft] [--compiled on]

Setup (the same for every variant): a bias-free ``nn.Linear(d, d)`` with frozen weight, input x of B x T tokens
(default 4 x 512 = 2048 tokens) that requires grad (as the input of an adapted projection inside a network does),
upstream gradient dL/dy fixed in advance. One timed call = forward + backward (grads of x and of every trainable
parameter); CuMA runs in training mode, so its router also records the Switch balance term, which is backpropagated
with the output (as in a real step).

Variants
  lora               peft.tuners.lora.layer.Linear, r=8, alpha=16
  cuma               cuma.tuners.cuma.layer.Linear, N=8, k=2, r=8, alpha=16, profile_dim=384, router hidden 256:
                     the reference path (``fast_path="off"``)
  cuma-fast          the same layer and parameters with ``fast_path="fused"`` (cuma.tuners.fused)
  cuma-fast-compiled ``fast_path="fused", fast_path_compile=True`` (torch.compile, inductor; with --compiled on;
                     compilation happens in the warm-up calls and is not timed)
  cuma-fused-router  a prototype: the fast path plus the router's first Linear and the experts' A as one GEMM
                     (benchmarks/_proto.py; checked to give the layer's outputs and gradients; --protos off skips it,
                     and --quick skips it unless --protos on)

``--build direct`` (default) instantiates the layer classes directly and runs each CuMA call inside its own
``layer.routing_scope.call(profile_rows=...)``, so neither variant pays PEFT's model-level forward hooks;
``--build peft`` wraps the Linear as ``q_proj`` of a tiny module and goes through ``peft.get_peft_model`` and
``PeftModel.forward`` (adds the same small per-call hook overhead to both).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from torch import nn

from _proto import PROTOS, check_same, patch_model
from _common import (
    base_parser,
    environment,
    paired_ratio,
    print_table,
    setup_torch,
    summarize,
    time_interleaved,
    verdict,
    write_json,
)

import cuma  # noqa: E402  (registers the tuner with PEFT)
from cuma.tuners.cuma.layer import Linear as CuMALinear  # noqa: E402

TARGET_RATIO_4096 = 1.3
PROFILE_DIM = 384


def cuma_config(fast_path: str = "off", compile: bool = False) -> "cuma.CuMAConfig":
    return cuma.CuMAConfig(
        target_modules=["q_proj"], r=8, lora_alpha=16, num_experts=8, top_k=2, profile_dim=PROFILE_DIM, router_hidden=256,
        fast_path=fast_path, fast_path_compile=compile,
    )


def lora_config():
    from peft import LoraConfig

    return LoraConfig(target_modules=["q_proj"], r=8, lora_alpha=16, lora_dropout=0.0)


class _Holder(nn.Module):
    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.q_proj = lin

    def forward(self, x):
        return self.q_proj(x)


def _frozen_linear(d: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(d, d, bias=False)
    lin.requires_grad_(False)
    return lin


CUMA_VARIANTS = {"cuma": ("off", False), "cuma-fast": ("fused", False), "cuma-fast-compiled": ("fused", True)}


def build(d: int, tokens: tuple[int, int], mode: str, seed: int, with_proto: bool, compiled: bool = False):
    from peft.tuners.lora.layer import Linear as LoraLinear

    B, T = tokens
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(B, T, d, generator=gen).requires_grad_(True)
    grad_y = torch.randn(B, T, d, generator=gen)
    profile = torch.randn(B, PROFILE_DIM, generator=gen)

    # name -> (module, forward, CuMA layer or None); every CuMA variant starts from the same seed (same parameters)
    variants: dict[str, tuple[nn.Module, callable, object]] = {}
    names = [n for n in CUMA_VARIANTS if compiled or n != "cuma-fast-compiled"]
    if mode == "direct":
        lora = LoraLinear(_frozen_linear(d, seed), "default", lora_config(), r=8, lora_alpha=16).train()
        variants["lora"] = (lora, lambda: lora(x), None)
        for name in names:
            layer = CuMALinear(_frozen_linear(d, seed), "default", cuma_config(*CUMA_VARIANTS[name])).train()
            variants[name] = (layer, (lambda layer=layer: layer(x)), layer)
    else:
        from peft import get_peft_model

        lora_model = get_peft_model(_Holder(_frozen_linear(d, seed)), lora_config()).train()
        variants["lora"] = (lora_model, lambda: lora_model(x), None)
        for name in names:
            torch.manual_seed(seed)
            model = get_peft_model(_Holder(_frozen_linear(d, seed)), cuma_config(*CUMA_VARIANTS[name])).train()
            variants[name] = (model, (lambda model=model: model(x, profile_embeds=profile)), model.base_model.model.q_proj)
    if with_proto:
        for pname, fn in PROTOS.items():
            torch.manual_seed(seed)
            layer = CuMALinear(_frozen_linear(d, seed), "default", cuma_config("fused")).train()
            check_same(layer, x[:, : min(T, 64)], fn, profile)
            patch_model(nn.Sequential(layer), fn)
            variants[pname] = (layer, (lambda layer=layer: layer(x)), layer)
    for name, (_, _, layer) in variants.items():  # every CuMA variant has the same parameters
        if layer is not None and name != "cuma":
            layer.load_state_dict(variants["cuma"][2].state_dict())

    def make_step(module: nn.Module, fwd, layer):
        params = [p for p in module.parameters() if p.requires_grad]

        def step():
            x.grad = None
            for p in params:
                p.grad = None
            if layer is None:
                outs, grads = [fwd()], [grad_y]
            elif mode == "direct":
                with layer.routing_scope.call(profile_rows=profile, records_balance=True) as call:
                    y = fwd()
                outs, grads = [y, torch.stack(call.balance_terms).sum()], [grad_y, torch.ones(())]
            else:
                cuma.clear_balance_loss(module)
                y = fwd()
                outs, grads = [y, cuma.pop_balance_loss(module)], [grad_y, torch.ones(())]
            torch.autograd.backward(outs, grads)

        return step

    steps = {name: make_step(*v) for name, v in variants.items()}
    n_params = {name: sum(p.numel() for p in v[0].parameters() if p.requires_grad) for name, v in variants.items()}
    return steps, n_params


def main() -> None:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=[576, 4096])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--build", choices=["direct", "peft"], default="direct")
    p.add_argument("--protos", choices=["on", "off"], default=None,
                   help="time the cuma-fused-router prototype (default: on, off with --quick)")
    p.add_argument("--compiled", choices=["on", "off"], default="off",
                   help="also time cuma-fast-compiled (fast_path_compile=True; compiled in the warm-up)")
    args = p.parse_args()
    threads = setup_torch(args.threads, args.seed, args.wait_load)
    env = environment(threads)
    tokens = (args.batch, args.seq)
    print(f"bench_layer: fwd+bwd of one adapted {args.build}-built Linear, fp32, {threads} threads, "
          f"tokens {tokens[0]}x{tokens[1]}={tokens[0] * tokens[1]}, torch {torch.__version__}")

    with_protos = (args.protos or ("off" if args.quick else "on")) == "on"
    rows, results = [], []
    for d in args.dims:
        big = d >= 2048
        if args.quick:
            reps, warmup, budget = (3, 1, 10.0) if big else (10, 2, 4.0)
        else:
            reps, warmup, budget = (11, 2, 100.0) if big else (40, 3, 30.0)
        reps = args.reps or reps
        warmup = args.warmup if args.warmup is not None else warmup
        steps, n_params = build(d, tokens, args.build, args.seed, with_protos, args.compiled == "on")
        if args.compiled == "on":
            warmup = max(warmup, 2)
        times = time_interleaved(steps, reps=reps, warmup=warmup, budget_s=budget)
        entry = {"d": d, "tokens": list(tokens), "reps": len(times["lora"]), "variants": {}, "ratios": {}}
        for name, t in times.items():
            s = summarize(t)
            entry["variants"][name] = {**s, "trainable_params": n_params[name], "times_ms": [1e3 * v for v in t]}
            row = {"d": d, "variant": name, "params": n_params[name], **s}
            if name != "lora":
                r = paired_ratio(t, times["lora"])
                entry["ratios"][f"{name}/lora"] = r
                row["ratio"] = r["median_paired_ratio"]
            rows.append(row)
        for pname in times:
            if pname.startswith("cuma-"):
                entry["ratios"][f"{pname}/cuma"] = paired_ratio(times[pname], times["cuma"])
        results.append(entry)

    print()
    print_table(
        rows,
        [("d", "d", "d"), ("variant", "variant", ""), ("params", "trainable", ",d"), ("median_ms", "median ms", ".1f"),
         ("q1_ms", "q1 ms", ".1f"), ("q3_ms", "q3 ms", ".1f"), ("n", "n", "d"), ("ratio", "x LoRA (paired)", ".3f")],
    )
    print()
    summary = {}
    for e in results:
        r = e["ratios"]["cuma/lora"]
        line = (f"d={e['d']}: CuMA/LoRA = {r['median_paired_ratio']:.3f} (median of paired ratios), "
                f"{r['ratio_of_medians']:.3f} (ratio of medians), {r['min_ratio']:.3f} (ratio of minima)")
        if e["d"] == 4096:
            v = verdict(r["median_paired_ratio"], TARGET_RATIO_4096)
            line += f"  target <= {TARGET_RATIO_4096}: {v}"
            summary["target_cuma_over_lora_at_4096"] = {"target": TARGET_RATIO_4096, "value": r["median_paired_ratio"], "verdict": v}
        print(line)
        for pname in e["variants"]:
            if f"{pname}/cuma" in e["ratios"]:
                rp = e["ratios"][f"{pname}/cuma"]
                print(f"        {pname}/cuma = {rp['median_paired_ratio']:.3f} (paired), "
                      f"{rp['ratio_of_medians']:.3f} (medians), {rp['min_ratio']:.3f} (minima)")
    write_json(args.json, {"benchmark": "bench_layer", "env": env, "config": vars(args), "results": results, "summary": summary})


if __name__ == "__main__":
    main()
