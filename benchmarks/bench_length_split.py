"""The demo's training step on whole batches against the same batches cut into micro-batches of similar length
(`train.split_by_length`), every demo method, side by side in one run.

    python benchmarks/bench_length_split.py [--quick] [--threads N] [--reps 3] [--parts 2] [--json PATH]

The collator pads a batch to its longest row. The demo's prompts are 82-118 tokens long, so a random batch of 8
carries about 16% padding, which costs as much as real tokens on the CPU. Sorting a batch's rows by length and
running them as ``--parts`` micro-batches, each padded only to its own longest row, keeps the optimizer step's rows
(one step per batch, the same gradient for the task loss) and drops most of that padding.

One timed call = one optimizer step over each of ``--batches`` real demo batches of 8 (random draws from the demo's
training pairs, SmolLM2-135M, q_proj and v_proj of all 30 layers, the demo's method options):

- ``whole``: zero_grad, forward, loss (+ the routers' balance term), backward, AdamW step;
- ``split``: zero_grad, then per micro-batch forward, its share of the loss (its labelled tokens over the batch's)
  plus its share of the balance term, backward; then the AdamW step.

Printed: the padding share of both, median seconds per variant, the paired split / whole ratio per method, and the
largest difference between the two variants' gradients of the task loss on one batch (LoRA: the gradients must
agree to rounding; CuMA's balance term is a per-micro-batch mean under the split, as under gradient accumulation,
so only its task-loss gradient is compared).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch

from _common import base_parser, environment, paired_ratio, print_table, setup_torch, summarize, time_interleaved, write_json
from bench_demo_step import records

import cuma  # noqa: E402
from cuma import demo, methods
from cuma.train.collator import ProfileCollator, split_by_length, tokenize_example

METHODS = ["lora", "cuma-semantic", "cuma"]


def labelled(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())  # the causal LM loss counts shifted labels


def task_loss(model, parts: list[dict], total: int) -> torch.Tensor:
    """The whole batch's mean token loss, as the sum of the micro-batches' shares."""
    return sum(model(**p).loss * (labelled(p) / total) for p in parts)


def make_step(model, opt, batches: list[dict], parts: int):
    split = [split_by_length(b, parts) for b in batches]

    def step():
        for whole, pieces in zip(batches, split):
            opt.zero_grad(set_to_none=True)
            total = labelled(whole)
            for p in pieces:
                cuma.clear_balance_loss(model)
                loss = model(**p).loss * (labelled(p) / total)
                aux = cuma.pop_balance_loss(model)
                (loss + aux / len(pieces) if aux is not None else loss).backward()
            opt.step()

    return step


def grad_difference(model, batch: dict, parts: int) -> float:
    """Largest |difference| between the task-loss gradients of the whole batch and of its micro-batches, relative to
    the largest gradient entry."""
    params = [q for q in model.parameters() if q.requires_grad]

    def grads(pieces):
        model.zero_grad(set_to_none=True)
        cuma.clear_balance_loss(model)
        task_loss(model, pieces, labelled(batch)).backward()
        cuma.clear_balance_loss(model)
        return torch.cat([q.grad.flatten() for q in params if q.grad is not None])

    a, b = grads([batch]), grads(split_by_length(batch, parts))
    model.zero_grad(set_to_none=True)
    return float((a - b).abs().max() / a.abs().max().clamp(min=1e-30))


def padding_share(batches: list[dict], parts: int) -> float:
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    padded = sum(p["attention_mask"].numel() for b in batches for p in split_by_length(b, parts))
    return 1 - real / padded


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=None, help="real batches of 8 per timed call (default 4; quick 2)")
    p.add_argument("--parts", type=int, default=2, help="micro-batches per batch in the split variant")
    args = p.parse_args()
    threads = setup_torch(args.threads, args.seed, args.wait_load)
    from cuma.models import load_base, load_tokenizer

    n_batches = args.batches or (2 if args.quick else 4)
    tok = load_tokenizer("smollm2-135m")
    recs = records("after", 8 * n_batches * 4, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    picks = torch.randperm(len(recs), generator=gen)[: 8 * n_batches].tolist()
    examples = [tokenize_example(recs[i], tok, True, 512) for i in picks]
    table = torch.nn.functional.normalize(torch.randn(max(r["profile_index"] for r in recs) + 1, 384, generator=gen), dim=-1)
    fns, checks = {}, {}
    for method in METHODS:
        built = methods.build(method, load_base("smollm2-135m"), **demo.method_options(method, "fast"))
        model = built.model.train()
        collate = ProfileCollator(pad_token_id=tok.pad_token_id, profile_table=table, uses_profile=built.uses_profile)
        batches = [collate(examples[8 * i : 8 * i + 8]) for i in range(n_batches)]
        if built.uses_profile:  # router_profile_center="train": centred on these rows
            cuma.fit_profile_center(model, torch.cat([b["profile_embeds"] for b in batches]))
        checks[method] = grad_difference(model, batches[0], args.parts)
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
        fns[f"{method}/whole"] = make_step(model, opt, batches, 1)
        fns[f"{method}/split{args.parts}"] = make_step(model, opt, batches, args.parts)
    shares = {"whole": padding_share(batches, 1), f"split{args.parts}": padding_share(batches, args.parts)}
    reps = args.reps or (2 if args.quick else 3)
    times = time_interleaved(fns, reps=reps, warmup=args.warmup if args.warmup is not None else 1)
    rows = [{"variant": k, **summarize(v)} for k, v in times.items()]
    print(f"padding share of the tokens: whole {shares['whole']:.3f}, split{args.parts} {shares[f'split{args.parts}']:.3f} "
          f"({n_batches} batches of 8)")
    print_table(rows, [("variant", "variant", ""), ("median_ms", "median ms", ".0f"), ("min_ms", "min ms", ".0f")])
    ratios = {m: paired_ratio(times[f"{m}/split{args.parts}"], times[f"{m}/whole"]) for m in METHODS}
    for m, r in ratios.items():
        print(f"{m}: split{args.parts} / whole = {r['median_paired_ratio']:.3f} (ratio of medians "
              f"{r['ratio_of_medians']:.3f}); task-loss gradient max rel. difference {checks[m]:.2e}")
    write_json(args.json, {"env": environment(threads), "padding_share": shares, "rows": rows, "ratios": ratios,
                           "grad_max_rel_difference": checks, "times": times})


if __name__ == "__main__":
    main()
