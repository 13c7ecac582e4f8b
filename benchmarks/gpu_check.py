"""GPU check: training and generation throughput, and peak memory, of CuMA's paths vs LoRA on a ~1B Qwen3-style model.

    python benchmarks/gpu_check.py             # CUDA: random bf16 weights, batch 4 x 1024, a few steps per method
    python benchmarks/gpu_check.py --dry-run   # CPU: the same code path on a tiny model (what the tests run)

Methods, side by side in one run (each on its own freshly built model, same seed, same batch):

  lora                  PEFT LoRA r=64 (alpha 128) on q_proj, v_proj
  cuma_reference        CuMA r=64, N=8, k=2, profile 1024, router hidden 256: today's path (fast_path="off")
  cuma_fast             the full fast path: fast_path="triton", fast_path_compile=True (routing through
                        torch.compile, top-k experts in the Triton kernels of cuma.kernels.routed_lora)
  cuma_loop             the authors'-style per-expert loop (benchmarks/_proto.py loop_forward: nonzero + index_add per
                        expert, host synchronisations included)
  cuma_fused            fast_path="fused" (static-shape eager functions, dense experts)
  cuma_fused_compiled   fast_path="fused", fast_path_compile=True
  cuma_triton           fast_path="triton" without compile (eager routing, Triton experts)

The last three attribute the fast path's gain; ``--methods`` picks a subset. For every method: training tokens/s,
step time and peak memory (bf16 autocast, AdamW, warm-up steps untimed, torch.compile compiles there), and generation
tokens/s at batch 16 with 16 different profiles (greedy, prompt 128, 64 new tokens). Prints one line per method and
the ratios; ``--json FILE`` writes ``{"device", "methods": {name: {...}}, "ratios", "targets"}`` after every method,
so a run cut short still leaves what it measured. The model is built from a config in code (random weights, nothing
downloaded). Figures: docs/performance.md ("Fast path") and docs/scaling.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))
sys.path.insert(0, HERE)

import torch  # noqa: E402

# name -> (registry method, extra options, patch the CuMA layers with the per-expert loop)
METHODS = {
    "lora": ("lora", {}, False),
    "cuma_reference": ("cuma", {"fast_path": "off"}, False),
    "cuma_fast": ("cuma", {"fast_path": "triton", "fast_path_compile": True}, False),
    "cuma_loop": ("cuma", {"fast_path": "off"}, True),
    "cuma_fused": ("cuma", {"fast_path": "fused"}, False),
    "cuma_fused_compiled": ("cuma", {"fast_path": "fused", "fast_path_compile": True}, False),
    "cuma_triton": ("cuma", {"fast_path": "triton"}, False),
}
REQUIRED = ("lora", "cuma_reference", "cuma_fast", "cuma_loop")
TARGETS = {"cuma_fast/lora tokens_per_s >=": 0.85, "cuma_fast/lora peak_memory <=": 1.10,
           "cuma_fast/cuma_loop tokens_per_s >=": 2.0}


def qwen3_config(dry_run: bool):
    from transformers import Qwen3Config

    if dry_run:
        return Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                           tie_word_embeddings=True)
    # Qwen3-1.7B's width with 16 layers: ~1.1B parameters (tied embeddings)
    return Qwen3Config(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=16,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
                       tie_word_embeddings=True)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_method(name: str, args, device, dtype) -> dict:
    from transformers import AutoModelForCausalLM

    from cuma import methods
    from cuma.routing import clear_balance_loss, pop_balance_loss

    method, extra, loop = METHODS[name]
    r = args.r
    options = dict(r=r, lora_alpha=2 * r)
    if method == "cuma":
        options.update(profile_dim=args.profile_dim, router_hidden=args.router_hidden, **extra)
        if args.dry_run:
            options["fast_path_compile"] = False  # inductor on a CPU takes minutes; the tests cover compile
    torch._dynamo.reset()
    torch.manual_seed(0)
    config = qwen3_config(args.dry_run)
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(config, dtype=dtype)
    built = methods.build(method, base, **options)
    model = built.model.to(device).train()
    if loop:
        from _proto import loop_forward, patch_model

        patched = patch_model(model, loop_forward)
        assert patched > 0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, config.vocab_size, (args.batch, args.seq_len), generator=g).to(device)
    mask = torch.ones_like(ids)
    profile = torch.randn(args.batch, args.profile_dim, generator=g).to(device) if built.uses_profile else None
    extra_kw = {"profile_embeds": profile} if profile is not None else {}
    autocast = torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda")

    def step():
        clear_balance_loss(model)
        with autocast:
            loss = model(input_ids=ids, attention_mask=mask, labels=ids, **extra_kw).loss
        balance = pop_balance_loss(model)
        if balance is not None:
            loss = loss + balance
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    _sync(device)
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    _sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    result = {
        "method": method,
        "options": {k: v for k, v in options.items()},
        "per_expert_loop": loop,
        "parameters": built.base_parameters,
        "trainable": built.trainable_parameters,
        "tokens_per_s": args.steps * args.batch * args.seq_len / seconds,
        "step_s": seconds / args.steps,
        "warmup_s": warmup_s,
        "peak_memory_gib": peak / 1024**3,
        "loss": float(loss.detach()),
    }
    del opt
    for p in params:
        p.grad = None
    _free(device)
    if args.generate:
        result.update(generation(model, config, args, device, dtype, built.uses_profile))
    del model, built, base, params
    torch._dynamo.reset()
    _free(device)
    return result


def generation(model, config, args, device, dtype, uses_profile: bool) -> dict:
    """Greedy generation, batch ``args.gen_batch`` with one different profile per row, fixed number of new tokens."""
    model.eval()
    g = torch.Generator().manual_seed(1)
    rows = args.gen_batch
    ids = torch.randint(10, config.vocab_size, (rows, args.gen_prompt), generator=g).to(device)
    mask = torch.ones_like(ids)
    kw = {"profile_embeds": torch.randn(rows, args.profile_dim, generator=g).to(device)} if uses_profile else {}
    new = args.gen_tokens

    def run(n):
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0, **kw)
        return out

    run(min(4, new))  # warm-up: prefill and decode shapes (and their compilation)
    _sync(device)
    t0 = time.perf_counter()
    out = run(new)
    _sync(device)
    seconds = time.perf_counter() - t0
    generated = (out.shape[1] - ids.shape[1]) * rows
    model.train()
    return {"generate_tokens_per_s": generated / seconds, "generate_s": seconds, "generate_batch": rows,
            "generate_new_tokens": out.shape[1] - ids.shape[1], "generate_prompt": args.gen_prompt}


def ratios(methods: dict) -> dict:
    def get(name, key):
        m = methods.get(name) or {}
        return m.get(key)

    out = {}
    for a, b in (("cuma_fast", "lora"), ("cuma_reference", "lora"), ("cuma_fast", "cuma_reference"),
                 ("cuma_fast", "cuma_loop"), ("cuma_reference", "cuma_loop"), ("cuma_fused", "cuma_reference"),
                 ("cuma_fused_compiled", "cuma_reference"), ("cuma_triton", "cuma_reference")):
        for key in ("tokens_per_s", "peak_memory_gib", "generate_tokens_per_s"):
            x, y = get(a, key), get(b, key)
            if x is not None and y:
                out[f"{a}/{b} {key}"] = x / y
    return out


def targets(rat: dict, on_gpu: bool) -> dict:
    res = {}
    for label, target in TARGETS.items():
        key = label.rsplit(" ", 1)[0].replace(" peak_memory", " peak_memory_gib")
        value = rat.get(key)
        if value is None:
            verdict = "not measured"
        elif not on_gpu:
            verdict = "n/a (not a GPU run)"
        else:
            ok = value >= target if label.endswith(">=") else value <= target
            verdict = "MET" if ok else "NOT MET"
        res[label] = {"target": target, "value": value, "verdict": verdict}
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny model on the CPU (checks the code path only)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                    help="methods to run, in this order (default: all)")
    ap.add_argument("--seq-len", type=int, default=None, help="default 1024 (dry run: 32)")
    ap.add_argument("--batch", type=int, default=None, help="default 4 (dry run: 2)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 5; dry run: 1)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; dry run: 1)")
    ap.add_argument("--r", type=int, default=64, help="rank of CuMA experts and LoRA (default 64, alpha 2r)")
    ap.add_argument("--no-generate", dest="generate", action="store_false", help="skip the generation timing")
    ap.add_argument("--gen-tokens", type=int, default=None, help="new tokens per row (default 64; dry run: 4)")
    ap.add_argument("--budget", type=float, default=230.0,
                    help="seconds after which the optional methods (beyond the four required ones) are skipped")
    ap.add_argument("--json", default=None, help="write the results to this file (after every method)")
    args = ap.parse_args(argv)
    dry = args.dry_run
    args.seq_len = args.seq_len or (32 if dry else 1024)
    args.batch = args.batch or (2 if dry else 4)
    args.steps = args.steps or (1 if dry else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if dry else 3)
    args.gen_tokens = args.gen_tokens or (4 if dry else 64)
    args.gen_batch, args.gen_prompt = (4, 8) if dry else (16, 128)
    args.profile_dim, args.router_hidden = (16, 8) if dry else (1024, 256)
    if dry:
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device (use --dry-run on a CPU)", file=sys.stderr)
            return 2
        device, dtype = torch.device("cuda"), torch.bfloat16
        torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    print(f"device {device} ({name}), dtype {dtype}, torch {torch.__version__}, triton {triton_version}, "
          f"seq_len {args.seq_len}, batch {args.batch}, steps {args.steps}, warmup {args.warmup}", flush=True)

    start = time.perf_counter()
    payload = {
        "device": name,
        "device_type": device.type,
        "dtype": str(dtype),
        "torch": torch.__version__,
        "triton": triton_version,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "seq_len": args.seq_len,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "r": args.r,
        "methods": {},
    }

    def write():
        payload["ratios"] = ratios(payload["methods"])
        payload["targets"] = targets(payload["ratios"], device.type == "cuda")
        payload["elapsed_s"] = time.perf_counter() - start
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as fh:
                json.dump(payload, fh, indent=2)

    order = [m for m in args.methods if m in REQUIRED] + [m for m in args.methods if m not in REQUIRED]
    for method in order:
        if method not in REQUIRED and time.perf_counter() - start > args.budget:
            payload["methods"][method] = {"skipped": f"time budget of {args.budget:.0f} s spent"}
            print(f"{method:20s} skipped (time budget)", flush=True)
            write()
            continue
        try:
            res = run_method(method, args, device, dtype)
        except Exception as err:  # noqa: BLE001 - record the failure, keep measuring the others
            res = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}
            print(f"{method:20s} FAILED: {res['error']}", flush=True)
            _free(device)
        else:
            gen = (f"  generate {res['generate_tokens_per_s']:,.0f} tokens/s" if "generate_tokens_per_s" in res
                   else "")
            print(f"{method:20s} trainable {res['trainable'] / 1e6:7.1f}M  {res['tokens_per_s']:10,.0f} tokens/s  "
                  f"step {res['step_s'] * 1000:7.1f} ms  peak {res['peak_memory_gib']:6.2f} GiB  "
                  f"(warm-up {res['warmup_s']:.0f} s){gen}", flush=True)
        payload["methods"][method] = res
        write()

    rat = payload["ratios"]
    for key, value in rat.items():
        print(f"ratio {key}: {value:.3f}")
    for label, t in payload["targets"].items():
        v = "-" if t["value"] is None else f"{t['value']:.3f}"
        print(f"target {label} {t['target']}: {v} {t['verdict']}")
    print(f"elapsed {payload['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
