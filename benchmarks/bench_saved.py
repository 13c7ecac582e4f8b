"""Activation memory one adapted Linear keeps for backward: LoRA vs CuMA's reference path vs its fast paths (CPU).

    python benchmarks/bench_saved.py [--tokens 4096] [--d 2048] [--r 64] [--triton] [--json PATH]

Counts the bytes of the tensors autograd saves for backward during ONE training forward of one adapted
``nn.Linear(d, d)`` (``torch.autograd.graph.saved_tensors_hooks``; storages counted once; the layer input, the frozen
weight and the trainable parameters excluded, since every variant keeps those anyway). Default shapes are the GPU
check's (docs/performance.md, "Fast path"): d = 2048, 4096 tokens (4 x 1024), r = 64, N = 8, k = 2, profile 1024,
router hidden 256, fp32 here (bf16 halves every figure). This is an exact count, not a timing: the machine's load does
not change it. ``--triton`` adds ``fast_path="triton"`` through Triton's CPU interpreter (slow: a minute or more).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import torch  # noqa: E402
from torch import nn  # noqa: E402


def saved_bytes(fn, exclude: list[torch.Tensor]) -> int:
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in skip:
                seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--triton", action="store_true", help="also fast_path='triton' (Triton's CPU interpreter)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.triton:
        os.environ["TRITON_INTERPRET"] = "1"
    import cuma
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear

    from cuma.routing_state import RoutingScope
    from cuma.tuners.cuma.layer import Linear as CuMALinear
    from cuma.tuners.hydralora.layer import Linear as HydraLinear

    torch.manual_seed(0)
    d, r, m = args.d, args.r, args.tokens
    x = torch.randn(4, m // 4, d, requires_grad=True)
    profile = torch.randn(4, 1024)

    def frozen():
        torch.manual_seed(0)
        return nn.Linear(d, d, bias=False).requires_grad_(False)

    rows = {}
    lora = LoraLinear(frozen(), "default", LoraConfig(r=r, lora_alpha=2 * r), r=r, lora_alpha=2 * r).train()
    rows["lora"] = saved_bytes(lambda: lora(x), [x, *lora.parameters()])
    paths = ["off", "fused"] + (["triton"] if args.triton else [])
    for path in paths:
        cfg = cuma.CuMAConfig(target_modules=["q_proj"], r=r, lora_alpha=2 * r, profile_dim=1024, router_hidden=256,
                              fast_path=path)
        layer = CuMALinear(frozen(), "default", cfg, RoutingScope("cuma")).train()

        def run(layer=layer):
            with layer.routing_scope.call(profile_rows=profile, records_balance=True):
                return layer(x)

        rows[f"cuma ({path})"] = saved_bytes(run, [x, profile, *layer.parameters(), layer.base_layer.weight])
    for path in ("off", "fused"):
        cfg = cuma.HydraLoRAConfig(target_modules=["q_proj"], r=r, lora_alpha=2 * r, router_hidden=256,
                                   lora_dropout=0.0, fast_path=path)
        layer = HydraLinear(frozen(), "default", cfg).train()
        rows[f"hydralora ({path})"] = saved_bytes(lambda layer=layer: layer(x),
                                                  [x, *layer.parameters(), layer.base_layer.weight])
    print(f"bench_saved: bytes saved for backward by one adapted Linear({d}, {d}), {m} tokens, r={r}, N=8, k=2, "
          f"fp32 (layer input and weights excluded)")
    for name, b in rows.items():
        print(f"  {name:18s} {b / 2**20:9.1f} MiB  {b / m:8.0f} bytes/token  {b / rows['lora']:6.2f}x LoRA")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"benchmark": "bench_saved", "config": vars(args), "bytes": rows,
                       "command": " ".join([os.path.basename(sys.executable), *sys.argv])}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
