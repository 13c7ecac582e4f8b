"""Training throughput (tokens/s) of every trainable method on SmolLM2-135M, measured side by side in one run.

    python benchmarks/bench_train_throughput.py [--quick] [--json PATH] [--methods lora,cuma,...] [--batch 8 --seq 128]

Each method is built by name through the registry (``cuma.methods.build``) with the demo's settings (r=8 for the
adapters, N=8 experts, top-2, router hidden 256, profile_dim 384) on its own copy of the base model. One timed call
is a full optimizer step: zero_grad, forward, the LM loss plus the routers' balance loss where the method has one,
backward, AdamW step. Variants are interleaved round by round (benchmarks/_common.py), so the ratios to LoRA are
paired measurements. Tokens/s counts every input token of the batch (no padding). Gradient checkpointing off.
"""

from __future__ import annotations

import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch

from _common import base_parser, environment, paired_ratio, print_table, setup_torch, summarize, time_interleaved, write_json

import cuma  # noqa: E402
from cuma import methods  # noqa: E402

ALL = ["lora", "dora", "cuma", "cuma-semantic", "cuma-soft", "hydralora", "mixlora", "prefix", "fft"]
OPTIONS = {
    "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
    "dora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
    "cuma": {"r": 8, "lora_alpha": 16, "num_experts": 8, "top_k": 2, "router_hidden": 256, "profile_dim": 384},
    "cuma-semantic": {"r": 8, "lora_alpha": 16, "num_experts": 8, "top_k": 2, "router_hidden": 256},
    "cuma-soft": {"r": 8, "lora_alpha": 16, "num_experts": 8, "router_hidden": 256, "profile_dim": 384},
    "hydralora": {"r": 8, "lora_alpha": 16, "num_experts": 8, "lora_dropout": 0.0},
    "mixlora": {"r": 8, "lora_alpha": 16, "num_experts": 8, "top_k": 2, "lora_dropout": 0.0},
    "prefix": {"num_virtual_tokens": 32},
    "fft": {},
}


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(ALL)}")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    args = p.parse_args()
    names = args.methods.split(",") if args.methods else (["lora", "cuma", "cuma-semantic"] if args.quick else ALL)
    batch = args.batch or (2 if args.quick else 8)
    seq = args.seq or (64 if args.quick else 128)
    reps = args.reps or (2 if args.quick else 3)
    threads = setup_torch(args.threads, args.seed, args.wait_load)

    base = cuma.models.load_base("smollm2-135m")
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(3, base.config.vocab_size, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    profile = torch.randn(batch, 384, generator=gen)

    steps, info = {}, {}
    for name in names:
        built = methods.build(name, copy.deepcopy(base), **OPTIONS[name])
        model = built.model.train()
        params = [q for q in model.parameters() if q.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5)
        info[name] = {"trainable_params": built.trainable_parameters}

        def step(model=model, opt=opt, uses_profile=built.uses_profile):
            opt.zero_grad(set_to_none=True)
            kwargs = {"input_ids": ids, "attention_mask": mask, "labels": ids}
            if uses_profile:
                kwargs["profile_embeds"] = profile
            cuma.clear_balance_loss(model)
            loss = model(**kwargs).loss
            balance = cuma.pop_balance_loss(model)
            if balance is not None:
                loss = loss + balance
            loss.backward()
            opt.step()

        steps[name] = step
    times = time_interleaved(steps, reps=reps, warmup=1)
    rows = []
    for name in names:
        s = summarize(times[name])
        ratio = paired_ratio(times[name], times["lora"])["median_paired_ratio"] if "lora" in times else float("nan")
        rows.append({
            "method": name, "trainable": info[name]["trainable_params"], "median_s": s["median_ms"] / 1e3,
            "tokens_per_s": batch * seq / (s["median_ms"] / 1e3), "vs_lora": ratio,
        })  # fmt: skip
    print(f"\nSmolLM2-135M training step, batch {batch} x {seq} tokens, fp32, {threads} threads, {reps} rounds\n")
    print_table(rows, [("method", "method", ""), ("trainable", "trainable", ","), ("median_s", "s/step", ".2f"),
                       ("tokens_per_s", "tokens/s", ".0f"), ("vs_lora", "time vs LoRA", ".2f")])
    write_json(args.json, {"benchmark": "train_throughput", "batch": batch, "seq": seq, "rows": rows,
                           "times_s": times, "env": environment(threads)})


if __name__ == "__main__":
    main()
