"""The CuMA adapter alone (frozen base Linear excluded): dense packed experts vs a per-expert Python loop, fp32 CPU.

    python benchmarks/bench_oracle.py [--quick] [--json PATH] [--dims 576] [--batch 4 --seq 512]

Design decision 4 (docs: /work/shared/DESIGN.md) computes the experts densely: ``x @ A_cat`` (N*r columns), multiply
by the gates (zeros outside the top-k), ``@ B_cat``. This benchmark checks that this is faster than the obvious
per-expert loop (for each expert: gather the tokens routed to it, apply B_i A_i, scatter-add back), forward+backward,
at d=576 (SmolLM2 width) on 2048 tokens (4 x 512), N=8, k=2, r=8, alpha=16.

Two comparisons, each asserted to give the same output and the same gradients (x, A, B, gate values) first:

  experts   routing fixed in advance (top-k indices and their renormalised weights, the weights a leaf that requires
            grad): ``dense`` is a line-for-line copy of the expert part of CuMALayer._expert_delta (it is also
            checked against the real method), ``loop`` is the per-expert oracle.
  adapter   router included: ``dense`` calls the real CuMALayer._expert_delta (router MLP on concat(h, e_d), top-k
            gates, dense experts); ``loop`` runs the same router and top-k gate functions, then the loop oracle.

Target: dense >= 2x faster than the loop on the experts comparison.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch

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

import cuma  # noqa: E402
from cuma.routing import topk_gates  # noqa: E402
from cuma.tuners.cuma.layer import Linear as CuMALinear  # noqa: E402

TARGET_SPEEDUP = 2.0
N, K, R, ALPHA, PROFILE_DIM = 8, 2, 8, 16, 384


def dense_experts(x3, a, b, top_vals, top_idx, scaling):
    """The expert part of CuMALayer._expert_delta (one A per expert), gates rebuilt from (values, indices) the way
    cuma.routing.topk_gates does (scatter into zeros)."""
    n, d_in, r = a.shape
    weights = torch.zeros(*top_vals.shape[:-1], n, dtype=top_vals.dtype).scatter(-1, top_idx, top_vals)
    a_cat = a.permute(1, 0, 2).reshape(d_in, n * r)
    z = (x3 @ a_cat).unflatten(-1, (n, r))
    z = z * weights.unsqueeze(-1)
    delta = z.flatten(-2) @ b.reshape(n * r, b.shape[-1])
    return delta * scaling


def loop_experts(x3, a, b, top_vals, top_idx, scaling):
    """Slow reference: one Python iteration per expert over the tokens routed to it."""
    n = a.shape[0]
    flat_x = x3.reshape(-1, x3.shape[-1])
    idx = top_idx.reshape(flat_x.shape[0], -1)
    vals = top_vals.reshape(flat_x.shape[0], -1)
    out = flat_x.new_zeros(flat_x.shape[0], b.shape[-1])
    for i in range(n):
        rows, slot = (idx == i).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        contrib = (flat_x.index_select(0, rows) @ a[i] @ b[i]) * (vals[rows, slot].unsqueeze(1) * scaling)
        out = out.index_add(0, rows, contrib)
    return out.reshape(*x3.shape[:-1], b.shape[-1])


def build_layer(d: int, seed: int, profile: torch.Tensor) -> CuMALinear:
    torch.manual_seed(seed)
    base = torch.nn.Linear(d, d, bias=False).requires_grad_(False)
    config = cuma.CuMAConfig(
        target_modules=["q_proj"], r=R, lora_alpha=ALPHA, num_experts=N, top_k=K, profile_dim=PROFILE_DIM,
        router_hidden=256, init_weights=False,  # non-zero B so that the experts' outputs are compared for real
    )
    # eval mode: the balance term is not recorded (it is not part of this comparison); dropout is 0 anyway. The
    # layer's calls run inside `layer.routing_scope.call(profile_rows=profile)` (see expert_delta below).
    return CuMALinear(base, "default", config).eval()


def expert_delta(layer: CuMALinear, x, profile):
    """The layer's own CuMALayer._expert_delta, inside a routing call that carries the profile rows."""
    with layer.routing_scope.call(profile_rows=profile, records_balance=False):
        return layer._expert_delta("default", x)


def _grads(out, grad_out, tensors):
    return torch.autograd.grad(out, tensors, grad_out)


def run_dim(d: int, tokens: tuple[int, int], reps: int, warmup: int, seed: int, budget):
    B, T = tokens
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(B, T, d, generator=gen).requires_grad_(True)
    grad_out = torch.randn(B, T, d, generator=gen)
    profile = torch.randn(B, PROFILE_DIM, generator=gen)
    layer = build_layer(d, seed, profile)
    a, b = layer.cuma_A["default"], layer.cuma_B["default"]
    router = layer.cuma_router["default"]
    scaling = layer.cuma_settings["default"].scaling

    with torch.no_grad():
        gates = topk_gates(router(x, profile), K)
        top_vals, top_idx = gates.weights.topk(K, dim=-1)
    top_vals = top_vals.clone().requires_grad_(True)

    # ---- exactness checks ------------------------------------------------------------------------------------
    with torch.no_grad():
        real = expert_delta(layer, x, profile)
        mine = dense_experts(x, a, b, top_vals, top_idx, scaling)
    torch.testing.assert_close(mine, real, rtol=1e-5, atol=1e-6)  # the local copy is the layer's computation
    leaves = [x, a, b, top_vals]
    y_d = dense_experts(x, a, b, top_vals, top_idx, scaling)
    y_l = loop_experts(x, a, b, top_vals, top_idx, scaling)
    torch.testing.assert_close(y_d, y_l, rtol=1e-4, atol=1e-5)
    for g1, g2 in zip(_grads(y_d, grad_out, leaves), _grads(y_l, grad_out, leaves)):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-4)

    router_params = list(router.parameters())
    adapter_leaves = [x, a, b, *router_params]

    def adapter_loop():
        g = topk_gates(router(x, profile), K)
        vals, idx = g.weights.topk(K, dim=-1)
        return loop_experts(x, a, b, vals, idx, scaling)

    y_d = expert_delta(layer, x, profile)
    y_l = adapter_loop()
    torch.testing.assert_close(y_d, y_l, rtol=1e-4, atol=1e-5)
    for g1, g2 in zip(_grads(y_d, grad_out, adapter_leaves), _grads(y_l, grad_out, adapter_leaves)):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-4)

    # ---- timing ---------------------------------------------------------------------------------------------
    def step(fn, tensors):
        def run():
            torch.autograd.grad(fn(), tensors, grad_out)

        return run

    fns = {
        "experts/dense": step(lambda: dense_experts(x, a, b, top_vals, top_idx, scaling), leaves),
        "experts/loop": step(lambda: loop_experts(x, a, b, top_vals, top_idx, scaling), leaves),
        "adapter/dense": step(lambda: expert_delta(layer, x, profile), adapter_leaves),
        "adapter/loop": step(adapter_loop, adapter_leaves),
    }
    times = time_interleaved(fns, reps=reps, warmup=warmup, budget_s=budget)
    tokens_per_expert = torch.bincount(top_idx.reshape(-1), minlength=N).tolist()
    return times, tokens_per_expert


def main() -> None:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=[576])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    args = p.parse_args()
    threads = setup_torch(args.threads, args.seed, args.wait_load)
    env = environment(threads)
    tokens = (args.batch, args.seq)
    reps = args.reps or (12 if args.quick else 60)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 3)
    print(f"bench_oracle: adapter only (no base Linear), fwd+bwd, fp32, {threads} threads, "
          f"tokens {tokens[0]}x{tokens[1]}={tokens[0] * tokens[1]}, N={N} k={K} r={R}, torch {torch.__version__}")

    rows, results, summary = [], [], {}
    for d in args.dims:
        times, per_expert = run_dim(d, tokens, reps, warmup, args.seed, budget=12.0 if args.quick else 150.0)
        entry = {"d": d, "tokens": list(tokens), "tokens_per_expert": per_expert, "variants": {}, "speedups": {}}
        for name, t in times.items():
            entry["variants"][name] = {**summarize(t), "times_ms": [1e3 * v for v in t]}
        for part in ("experts", "adapter"):
            r = paired_ratio(times[f"{part}/loop"], times[f"{part}/dense"])  # loop time / dense time = speed-up
            entry["speedups"][part] = r
            for impl in ("dense", "loop"):
                row = {"d": d, "part": part, "impl": impl, **entry["variants"][f"{part}/{impl}"]}
                if impl == "dense":
                    row["speedup"] = r["median_paired_ratio"]
                rows.append(row)
        results.append(entry)

    print()
    print_table(
        rows,
        [("d", "d", "d"), ("part", "part", ""), ("impl", "impl", ""), ("median_ms", "median ms", ".2f"),
         ("q1_ms", "q1 ms", ".2f"), ("q3_ms", "q3 ms", ".2f"), ("n", "n", "d"), ("speedup", "dense speed-up", ".2f")],
    )
    print()
    for e in results:
        print(f"d={e['d']}: tokens per expert {e['tokens_per_expert']}")
        for part, r in e["speedups"].items():
            line = (f"  {part}: loop/dense = {r['median_paired_ratio']:.2f}x (median of paired ratios), "
                    f"{r['ratio_of_medians']:.2f}x (ratio of medians), {r['min_ratio']:.2f}x (ratio of minima)")
            if part == "experts":
                v = verdict(r["median_paired_ratio"], TARGET_SPEEDUP, lower_is_better=False)
                line += f"  target >= {TARGET_SPEEDUP}x: {v}"
                summary[f"experts_speedup_d{e['d']}"] = {"target": TARGET_SPEEDUP, "value": r["median_paired_ratio"], "verdict": v}
            print(line)
    write_json(args.json, {"benchmark": "bench_oracle", "env": env, "config": vars(args), "results": results, "summary": summary})


if __name__ == "__main__":
    main()
