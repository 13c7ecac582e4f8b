"""Training step with TRL's fused LM head, every position scored vs only the labelled ones, side by side (CPU).

    python benchmarks/bench_lm_head.py [--quick] [--json PATH] [--method lora] [--batch 8 --seq 140 --answer 3]

TRL 1.16 scores only the labelled positions on Triton devices and every position elsewhere;
``cuma.train.sft.labelled_positions_only`` (what ProfileSFTTrainer uses on the CPU) makes the CPU take the compact
path too. One timed call: zero_grad, forward through the fused head (the demo's shape: a ~140-token prompt of which
only the answer tokens carry labels), backward. The two variants share one model and are interleaved round by round.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from trl.trainer.utils import add_fused_lm_head

from _common import base_parser, environment, paired_ratio, print_table, setup_torch, summarize, time_interleaved, write_json

from cuma import methods  # noqa: E402
from cuma.models import load_base  # noqa: E402
from cuma.train.sft import labelled_positions_only  # noqa: E402

OPTIONS = {
    "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
    "cuma": {"r": 8, "lora_alpha": 16, "num_experts": 8, "top_k": 2, "router_hidden": 256, "profile_dim": 384},
}


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--method", default="lora", choices=sorted(OPTIONS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=140)
    p.add_argument("--answer", type=int, default=3, help="labelled tokens at the end of each row")
    args = p.parse_args()
    threads = setup_torch(args.threads)
    base = load_base("smollm2-135m")
    add_fused_lm_head(base, outputs=("log_probs", "entropy", "is_top1"))  # what SFTTrainer does
    built = methods.build(args.method, base, **OPTIONS[args.method])
    model = built.model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (args.batch, args.seq), generator=g)
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, -100)
    labels[:, -args.answer:] = ids[:, -args.answer:]
    extra = {"profile_embeds": torch.randn(args.batch, 384, generator=g)} if built.uses_profile else {}

    def step(compact: bool):
        model.zero_grad(set_to_none=True)
        ctx = labelled_positions_only(torch.device("cpu")) if compact else torch.enable_grad()
        with ctx:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, **extra).loss
        loss.backward()
        return float(loss.detach())

    losses = {"all positions": step(False), "labelled only": step(True)}
    reps = args.reps or (3 if args.quick else 8)
    times = time_interleaved({"all positions": lambda: step(False), "labelled only": lambda: step(True)},
                             reps=reps, warmup=args.warmup or 1)
    rows = [{"variant": k, **summarize(v), "loss": losses[k]} for k, v in times.items()]
    ratio = paired_ratio(times["labelled only"], times["all positions"])
    print_table(rows, [("variant", "variant", ""), ("median_ms", "median ms", ".0f"), ("min_ms", "min ms", ".0f"),
                       ("loss", "loss", ".5f")])
    print(f"labelled only / all positions: {ratio['median_paired_ratio']:.3f} (median of paired rounds), "
          f"{ratio['ratio_of_medians']:.3f} (ratio of medians); {args.method}, batch {args.batch} x {args.seq}, "
          f"{threads} threads")
    write_json(args.json, {"env": environment(threads), "rows": rows, "ratio": ratio,
                           "shape": {"method": args.method, "batch": args.batch, "seq": args.seq, "answer": args.answer}})


if __name__ == "__main__":
    main()
