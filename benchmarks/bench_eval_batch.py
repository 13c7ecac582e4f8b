"""The demo's test scoring at several evaluation batch sizes, side by side in one run (the same pairs, interleaved).

    python benchmarks/bench_eval_batch.py [--quick] [--reps 3] [--pairs 64] [--threads N] [--json PATH]

One timed call = ``cuma.evaluate.wvb.evaluate_wvb`` over the first ``--pairs`` test pairs of a freshly prepared demo population
(the untrained SmolLM2-135M with the persona prompt, the demo's prompts; batches longest-first, padded to their own
longest row, one forward each, logits only at the answer position). Printed: median seconds per call for each batch
size, its ratio to batch 32 (the demo's earlier ``eval_batch_size``) and the largest difference between the option
distributions of two batch sizes (only float noise: scoring does not depend on the batching).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import torch

from _common import base_parser, environment, paired_ratio, print_table, setup_torch, summarize, time_interleaved, write_json

from cuma import demo, methods
from cuma.data.records import load_prepared
from cuma.evaluate.wvb import WVBEvalConfig, evaluate_wvb
from cuma.models import load_base_and_tokenizer

BATCHES = (8, 16, 32, 64)


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=64, help="test pairs per call (default 64)")
    args = p.parse_args()
    threads = setup_torch(args.threads, args.seed, args.wait_load)
    reps = args.reps or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = demo.DemoConfig(work=tmp, seed=args.seed)
        prepared, _, _ = demo.prepare_data(cfg, Path(tmp) / "data")
        data = load_prepared(prepared)
    n = min(16 if args.quick else args.pairs, len(data.test))
    base, tok = load_base_and_tokenizer("smollm2-135m")
    persona = methods.build("persona", base)
    probs: dict[int, list] = {}

    def call(b: int):
        config = WVBEvalConfig(split="test", limit=n, batch_size=b, per_question=False, progress=False)

        def run():
            with torch.no_grad():
                probs[b] = [p["probs"] for p in evaluate_wvb(persona, tok, data, config).predictions]
        return run

    times = time_interleaved({str(b): call(b) for b in BATCHES}, reps=reps, warmup=1)
    rows = []
    for b in BATCHES:
        s = summarize(times[str(b)])
        r = paired_ratio(times[str(b)], times["32"])
        diff = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(probs[b], probs[32]))
        rows.append({"batch": b, "median_s": s["median_ms"] / 1e3, "ratio_to_32": r["median_paired_ratio"],
                     "max_prob_diff_vs_32": diff})
    print(f"{n} test pairs per call, {threads} threads, {reps} interleaved rounds")
    print_table(rows, [("batch", "batch", "d"), ("median_s", "median s", ".2f"), ("ratio_to_32", "/ batch 32", ".3f"),
                       ("max_prob_diff_vs_32", "max |p - p32|", ".1e")])
    write_json(args.json, {"benchmark": "eval_batch", "pairs": n, "reps": reps, "rows": rows,
                           "times": times, "environment": environment(threads)})


if __name__ == "__main__":
    main()
