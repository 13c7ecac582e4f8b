"""The demo's training step before and after the cheaper prompts, for every demo method, side by side in one run.

    python benchmarks/bench_demo_step.py [--quick] [--reps 5] [--json PATH]

One timed call = zero_grad + forward + loss (+ the routers' balance term) + backward + AdamW step on one real batch
of the demo (batch 8, SmolLM2-135M, q_proj and v_proj of all 30 layers, the demo's method options), built by the
training collator from rendered chat prompts:

- ``before``: the earlier demo's prompts: the long system instruction ("You are answering a values survey. For each
  question, choose the option that best matches your own view.") and the 8-field profile sentence of the invented
  population (country, age group, gender, education, religion, ethnicity, employment, marital status);
- ``after``: today's: the short instruction ("Answer this values survey as yourself.") and the demo's 4-field profile
  (country, age group, gender, religion).

Both use the same questions, batch composition and right padding to the batch's longest row. Printed: median step
time per (method, prompt), the paired after/before ratio per method, and the mean prompt length of each. With
``--compile``, also ``after+compile``: the same step through ``torch.compile(model)`` (its compile time excluded and
printed), to check whether a compiled train step pays on the CPU.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch

from _common import base_parser, environment, paired_ratio, print_table, setup_torch, summarize, time_interleaved, write_json

import cuma  # noqa: E402
from cuma import demo, methods
from cuma.data import prompts

OLD_SYSTEM = "You are answering a values survey. For each question, choose the option that best matches your own view."
METHODS = ["lora", "cuma-semantic", "cuma"]


def records(style: str, n: int, seed: int) -> list[dict]:
    from cuma.data.records import load_prepared
    from cuma.data.splits import prepare_wvb
    from cuma.data.synthetic import SynthConfig, write_synthetic
    from cuma.data.wvb import load_wvb

    cfg = demo.DemoConfig(seed=seed)
    if style == "before":  # the earlier demo's population: 6 invented countries, every profile field
        synth = SynthConfig(participants=cfg.participants, questions=cfg.questions, modes=3, countries=6,
                            country_set="invented", seed=seed)
    else:
        synth = cfg.synth_config()
    root = tempfile.mkdtemp(prefix=f"bench-demo-{style}-")
    write_synthetic(os.path.join(root, "raw"), synth)
    prepare_wvb(load_wvb(os.path.join(root, "raw")), os.path.join(root, "prep"), train_pairs=n, test_pairs=0, seed=seed,
                encoder=None)
    return load_prepared(os.path.join(root, "prep"), embeddings=False).train


def make_batch(recs, tokenizer, system: str, uses_profile: bool):
    from cuma.train.collator import ProfileCollator, tokenize_example

    old = prompts.SYSTEM_INSTRUCTION
    prompts.SYSTEM_INSTRUCTION = system
    try:
        examples = [tokenize_example(r, tokenizer, True, 512) for r in recs]
    finally:
        prompts.SYSTEM_INSTRUCTION = old
    table = torch.nn.functional.normalize(torch.randn(max(r["profile_index"] for r in recs) + 1, 384), dim=-1)
    batch = ProfileCollator(pad_token_id=tokenizer.pad_token_id, profile_table=table, uses_profile=uses_profile)(examples)
    return batch, statistics.mean(len(e["input_ids"]) for e in examples)


def train_step(model, forward, opt, batch):
    """One timed call: zero_grad, ``forward`` (the model or its compiled version), loss + balance term, backward, step."""

    def step():
        opt.zero_grad(set_to_none=True)
        cuma.clear_balance_loss(model)
        loss = forward(**batch).loss
        aux = cuma.pop_balance_loss(model)
        (loss + aux if aux is not None else loss).backward()
        opt.step()

    return step


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--compile", action="store_true",
                   help="also time each method's after-step with torch.compile(model) (inductor; compile time excluded)")
    args = p.parse_args()
    threads = setup_torch(args.threads, args.seed, args.wait_load)
    from cuma.models import load_base, load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    recs = {style: records(style, 64, args.seed)[: args.batch] for style in ("before", "after")}
    systems = {"before": OLD_SYSTEM, "after": prompts.SYSTEM_INSTRUCTION}
    fns, lengths, compile_seconds, compile_errors = {}, {}, {}, {}
    for method in METHODS:
        built = methods.build(method, load_base("smollm2-135m"), **demo.method_options(method, "fast"))
        model = built.model.train()
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
        for style in ("before", "after"):
            batch, mean_len = make_batch(recs[style], tok, systems[style], built.uses_profile)
            if built.uses_profile and style == "before":  # router_profile_center="train": centred on these rows
                cuma.fit_profile_center(model, batch["profile_embeds"])
            lengths[style] = mean_len
            fns[f"{method}/{style}"] = train_step(model, model, opt, batch)
        if args.compile:
            batch, _ = make_batch(recs["after"], tok, systems["after"], built.uses_profile)
            compiled_step = train_step(model, torch.compile(model), opt, batch)
            t0 = time.perf_counter()
            try:
                compiled_step()  # compiles; excluded from the timings
            except Exception as err:  # a failed compile is a result too: recorded, the eager timings still run
                compile_errors[method] = f"{type(err).__name__}: {str(err)[:300]}"
                print(f"{method}: torch.compile failed: {compile_errors[method]}")
                continue
            compile_seconds[method] = time.perf_counter() - t0
            fns[f"{method}/after+compile"] = compiled_step
    reps = args.reps or (2 if args.quick else 5)
    times = time_interleaved(fns, reps=reps, warmup=args.warmup if args.warmup is not None else 1)
    rows = [{"variant": k, **summarize(v)} for k, v in times.items()]
    print(f"mean prompt+answer tokens: before {lengths['before']:.1f}, after {lengths['after']:.1f} "
          f"(batch {args.batch}, padded to the longest row)")
    print_table(rows, [("variant", "variant", ""), ("median_ms", "median ms", ".0f"), ("min_ms", "min ms", ".0f")])
    ratios = {m: paired_ratio(times[f"{m}/after"], times[f"{m}/before"]) for m in METHODS}
    for m, r in ratios.items():
        print(f"{m}: after/before = {r['median_paired_ratio']:.3f} (ratio of medians {r['ratio_of_medians']:.3f})")
    if args.compile:
        for m in compile_seconds:
            ratios[f"{m}/compile"] = paired_ratio(times[f"{m}/after+compile"], times[f"{m}/after"])
            print(f"{m}: compiled/eager = {ratios[f'{m}/compile']['median_paired_ratio']:.3f} "
                  f"(compile took {compile_seconds[m]:.0f} s)")
    write_json(args.json, {"env": environment(threads), "lengths": lengths, "rows": rows, "ratios": ratios,
                           "compile_seconds": compile_seconds, "compile_errors": compile_errors, "times": times})


if __name__ == "__main__":
    main()
