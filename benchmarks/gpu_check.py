"""GPU check: training throughput and peak memory of CuMA vs LoRA on a ~1B-parameter Qwen3-style model.

    python benchmarks/gpu_check.py             # CUDA: random bf16 weights, seq 1024, a few steps per method
    python benchmarks/gpu_check.py --dry-run   # CPU: the same code path on a tiny model (what the tests run)

Prints one line per method (tokens/s, peak memory) and the CuMA / LoRA ratios; ``--json FILE`` also writes them.
The model is built from a config in code (random weights, nothing downloaded). Figures go to docs/scaling.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import torch  # noqa: E402


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


def run_method(method: str, options: dict, args, device, dtype) -> dict:
    from transformers import AutoModelForCausalLM

    from cuma import methods
    from cuma.routing import clear_balance_loss, pop_balance_loss

    torch.manual_seed(0)
    config = qwen3_config(args.dry_run)
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(config, dtype=dtype)
    built = methods.build(method, base, **options)
    model = built.model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, config.vocab_size, (args.batch, args.seq_len), generator=g).to(device)
    mask = torch.ones_like(ids)
    extra = {"profile_embeds": torch.randn(args.batch, options["profile_dim"], generator=g).to(device)} \
        if built.uses_profile else {}

    def step():
        clear_balance_loss(model)
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss = model(input_ids=ids, attention_mask=mask, labels=ids, **extra).loss
        balance = pop_balance_loss(model)
        if balance is not None:
            loss = loss + balance
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    result = {
        "method": method,
        "parameters": built.base_parameters,
        "trainable": built.trainable_parameters,
        "tokens_per_s": args.steps * args.batch * args.seq_len / seconds,
        "step_s": seconds / args.steps,
        "peak_gib": peak / 1024**3,
        "loss": float(loss.detach()),
    }
    del model, built, base, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny model on the CPU (checks the code path only)")
    ap.add_argument("--seq-len", type=int, default=None, help="default 1024 (dry run: 32)")
    ap.add_argument("--batch", type=int, default=None, help="default 4 (dry run: 2)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 5; dry run: 1)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; dry run: 1)")
    ap.add_argument("--r", type=int, default=64, help="rank of CuMA experts and LoRA (default 64, alpha 2r)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)
    dry = args.dry_run
    args.seq_len = args.seq_len or (32 if dry else 1024)
    args.batch = args.batch or (2 if dry else 4)
    args.steps = args.steps or (1 if dry else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if dry else 2)
    if dry:
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device (use --dry-run on a CPU)", file=sys.stderr)
            return 2
        device, dtype = torch.device("cuda"), torch.bfloat16
        torch.backends.cuda.matmul.allow_tf32 = True
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), dtype {dtype}, "
          f"torch {torch.__version__}, seq_len {args.seq_len}, batch {args.batch}, steps {args.steps}")
    r = args.r
    runs = [
        run_method("cuma", dict(r=r, lora_alpha=2 * r, profile_dim=1024 if not dry else 16,
                                router_hidden=256 if not dry else 8), args, device, dtype),
        run_method("lora", dict(r=r, lora_alpha=2 * r), args, device, dtype),
    ]
    for res in runs:
        print(f"{res['method']:5s} params {res['parameters'] / 1e9:.3f}B trainable {res['trainable'] / 1e6:.1f}M  "
              f"{res['tokens_per_s']:,.0f} tokens/s  step {res['step_s'] * 1000:.0f} ms  peak {res['peak_gib']:.2f} GiB  "
              f"loss {res['loss']:.3f}")
    cu, lo = runs
    ratio_speed = cu["tokens_per_s"] / lo["tokens_per_s"]
    ratio_mem = cu["peak_gib"] / lo["peak_gib"] if lo["peak_gib"] else float("nan")
    print(f"ratio cuma/lora: tokens/s {ratio_speed:.3f}  peak memory {ratio_mem:.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"runs": runs, "ratio_tokens_per_s": ratio_speed, "ratio_peak_memory": ratio_mem,
                       "seq_len": args.seq_len, "batch": args.batch, "device": str(device)}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
