"""The demo's training step and test scoring with the frozen base in fp32 + SDPA (before) and in bf16 + eager
attention (after), for every demo method, side by side in one run.

    python benchmarks/bench_demo_dtype.py [--quick] [--reps 2] [--steps 4] [--pairs 48] [--threads N] [--json PATH]

Training: one timed call = ``--steps`` optimizer steps of the demo's own trainer (``cuma.demo.train_method``: batch 8 as two
micro-batches of similar length, the compact LM head, AdamW, the routers' balance term and lr split) on a freshly
prepared demo population, after one untimed step; the trainer's start (model load, tokenizing) is not timed. Each
round runs every (method, precision) once, in rotating order, so the after/before ratios are paired by round.
Scoring: one timed call = ``evaluate_wvb`` of the first ``--pairs`` test pairs with the untrained model and the
persona prompt (the demo's evaluation batch of 16). Printed: median seconds per call, the paired after/before ratio
per method, and how far the bf16 base moves the untrained model's option distributions (largest absolute
difference, share of pairs whose argmax answer changes). The two middle variants (fp32 + eager, bf16 + SDPA) are
timed with ``--all`` to separate the precision's share from the attention's.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
from transformers import TrainerCallback

from _common import base_parser, environment, paired_ratio, print_table, setup_torch, summarize, write_json

from cuma import demo
from cuma.data.records import load_prepared
from cuma.evaluate.wvb import WVBEvalConfig, evaluate_wvb

METHODS = ["lora", "cuma-semantic", "cuma"]
BEFORE, AFTER = ("float32", None), ("bfloat16", "eager")  # (dtype, attn_implementation; None = transformers' sdpa)
MIDDLE = [("float32", "eager"), ("bfloat16", "sdpa")]


def label(precision) -> str:
    dtype, attn = precision
    return f"{'fp32' if dtype == 'float32' else 'bf16'}+{attn or 'sdpa'}"


class StepClock(TrainerCallback):
    """Seconds of every optimizer step after the first (the first pays one-off allocations)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step > 1:
            self.times.append(time.perf_counter() - self._t0)


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps per call (default 4; --quick 2)")
    p.add_argument("--pairs", type=int, default=48, help="test pairs per scoring call (default 48)")
    p.add_argument("--all", action="store_true", help="also time fp32 + eager and bf16 + SDPA")
    args = p.parse_args()
    threads = setup_torch(args.threads, args.seed, args.wait_load)
    reps = args.reps or (1 if args.quick else 2)
    steps = args.steps or (2 if args.quick else 4)
    precisions = [BEFORE, *(MIDDLE if args.all else []), AFTER]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = demo.DemoConfig(seed=args.seed, work=tmp, curve_points=0, steps=steps + 1)
        prepared, _, _ = demo.prepare_data(cfg, Path(tmp) / "data")
        data = load_prepared(prepared)
        train: dict[str, list[float]] = {}
        score: dict[str, list[float]] = {}
        probs: dict[str, list] = {}
        n = min(args.pairs, len(data.test))
        for rnd in range(reps):
            order = precisions[rnd % len(precisions):] + precisions[: rnd % len(precisions)]
            for method in METHODS:
                for precision in order:
                    run_cfg = replace(cfg, dtype=precision[0], attn_implementation=precision[1])
                    clock = StepClock()
                    demo.train_method(run_cfg, method, prepared, Path(tmp) / "adapters" / method, callbacks=[clock])
                    train.setdefault(f"{method}/{label(precision)}", []).append(sum(clock.times))
                    print(f"round {rnd} {method} {label(precision)}: {sum(clock.times):.1f} s for {len(clock.times)} steps",
                          flush=True)
            for precision in order:
                run_cfg = replace(cfg, dtype=precision[0], attn_implementation=precision[1])
                base, tok = demo.load_base(run_cfg)
                t0 = time.perf_counter()
                preds = evaluate_wvb(base, tok, data, WVBEvalConfig(limit=n, batch_size=cfg.eval_batch_size,
                                                                    per_question=False, progress=False)).predictions
                score.setdefault(label(precision), []).append(time.perf_counter() - t0)
                probs[label(precision)] = [np.asarray(r["probs"]) for r in preds]
    rows = [{"variant": f"train {k}", **summarize(v)} for k, v in train.items()]
    rows += [{"variant": f"score {k}", **summarize(v)} for k, v in score.items()]
    print_table(rows, [("variant", "variant", ""), ("median_ms", "median ms", ".0f"), ("min_ms", "min ms", ".0f")])
    ratios = {}
    for m in METHODS:
        ratios[f"train {m}"] = paired_ratio(train[f"{m}/{label(AFTER)}"], train[f"{m}/{label(BEFORE)}"])
    ratios["score persona"] = paired_ratio(score[label(AFTER)], score[label(BEFORE)])
    for name, r in ratios.items():
        print(f"{name}: {label(AFTER)} / {label(BEFORE)} = {r['median_paired_ratio']:.3f} "
              f"(ratio of medians {r['ratio_of_medians']:.3f})")
    a, b = probs[label(AFTER)], probs[label(BEFORE)]
    drift = {
        "max_abs_prob_difference": float(max(np.abs(x - y).max() for x, y in zip(a, b))),
        "argmax_changed_share": float(np.mean([x.argmax() != y.argmax() for x, y in zip(a, b)])),
        "pairs": len(a),
    }
    print(f"untrained model, {drift['pairs']} pairs: bf16 moves an option probability by at most "
          f"{drift['max_abs_prob_difference']:.4f}; argmax answer changed on {100 * drift['argmax_changed_share']:.1f}%")
    write_json(args.json, {"env": environment(threads), "steps_per_call": steps, "rows": rows, "ratios": ratios,
                           "drift": drift, "train": train, "score": score})


if __name__ == "__main__":
    main()
