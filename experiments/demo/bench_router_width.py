"""The demo's training step and scoring forward with CuMA's routers 256 wide (the paper's absolute width) and 64 wide
(the paper's bottleneck ratio on SmolLM2), beside LoRA, side by side in one run.

    python experiments/demo/bench_router_width.py [--quick] [--threads 1] [--reps 4] [--json PATH]

The paper's router is Linear(d_in + d_profile -> 256), ReLU, Linear(256 -> N). On Qwen3-8B (d_in 4096, MiniLM
profile 384) that first layer is a 17.5x bottleneck; on SmolLM2-135M (d_in 576) the same 256 is a 3.75x
bottleneck, and the 60 routers (q_proj and v_proj of 30 layers) then cost about a seventh of the frozen model's
forward flops per token. A width of 64 keeps the paper's ratio (15x).

Timed calls, on one real demo batch (batch 8, the demo's prompts and method options, fast conditioning):

- ``step``: zero_grad + forward + loss + balance term + backward + AdamW step (what a training step costs);
- ``score``: one no-grad forward of the same batch (what an evaluation batch costs).

Printed: median seconds per (method, width, call) and the paired 64 / 256 ratio per method and call, plus each
model's trainable parameters. LoRA (no routers) is timed beside them as the reference for CuMA's overhead.
"""

from __future__ import annotations

import os
import sys

# the benchmarks' timing helpers and the demo batches of benchmarks/bench_demo_step.py
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))

import torch

from _common import base_parser, environment, paired_ratio, print_table, setup_torch, summarize, time_interleaved, write_json
from bench_demo_step import make_batch, records, train_step

import cuma  # noqa: E402
from cuma import demo, methods
from cuma.data import prompts

WIDTHS = (256, 64)


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()
    threads = setup_torch(args.threads, args.seed, args.wait_load)
    from cuma.models import load_base, load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    recs = records("after", 64, args.seed)[: args.batch]
    fns, params = {}, {}
    variants = [("lora", None)] + [(m, w) for m in ("cuma-semantic", "cuma") for w in WIDTHS]
    for method, width in variants:
        options = demo.method_options(method, "fast")
        if width is not None:
            options["router_hidden"] = width
        built = methods.build(method, load_base("smollm2-135m"), **options)
        model = built.model.train()
        trainable = [q for q in model.parameters() if q.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=1e-4)
        batch, _ = make_batch(recs, tok, prompts.SYSTEM_INSTRUCTION, built.uses_profile)
        if built.uses_profile:  # router_profile_center="train": centred on this batch's profiles
            cuma.fit_profile_center(model, batch["profile_embeds"])
        name = method if width is None else f"{method}/h{width}"
        params[name] = sum(q.numel() for q in trainable)
        fns[f"{name}/step"] = train_step(model, model, opt, batch)

        def score(_model=model, _batch=batch):
            with torch.no_grad():
                _model(**_batch)

        fns[f"{name}/score"] = score
    reps = args.reps or (2 if args.quick else 4)
    times = time_interleaved(fns, reps=reps, warmup=args.warmup if args.warmup is not None else 1)
    rows = [{"variant": k, **summarize(v)} for k, v in times.items()]
    print_table(rows, [("variant", "variant", ""), ("median_ms", "median ms", ".0f"), ("min_ms", "min ms", ".0f")])
    ratios = {}
    for method in ("cuma-semantic", "cuma"):
        for call in ("step", "score"):
            key = f"{method}/{call}"
            ratios[f"{key} h64/h256"] = paired_ratio(times[f"{method}/h64/{call}"], times[f"{method}/h256/{call}"])
            for w in WIDTHS:
                ratios[f"{method}/h{w}/{call} /lora"] = paired_ratio(times[f"{method}/h{w}/{call}"], times[f"lora/{call}"])
    for k, r in ratios.items():
        print(f"{k} = {r['median_paired_ratio']:.3f} (ratio of medians {r['ratio_of_medians']:.3f})")
    for k, n in params.items():
        print(f"trainable parameters {k}: {n:,}")
    write_json(args.json, {"env": environment(threads), "params": params, "rows": rows, "ratios": ratios,
                           "times": times})


if __name__ == "__main__":
    main()
