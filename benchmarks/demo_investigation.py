"""Why does (or doesn't) CuMA beat LoRA in `cuma demo`? Variants of the demo's training settings, compared on the
VALID split of the demo's synthetic population (the test split is never used to choose settings).

    python benchmarks/demo_investigation.py [--variants base,lr2e-3,router1e-2] [--steps 30] [--json PATH]

Each variant trains LoRA and CuMA with the same budget and reports accuracy, EMD, entropy and how far the CuMA routers
moved (spread of the expert load between countries). Data: the demo's population (same seed) with 160 valid pairs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from cuma import demo
from cuma.data.records import load_prepared
from cuma.data.splits import prepare_wvb
from cuma.data.synthetic import SynthConfig, write_synthetic
from cuma.data.wvb import load_wvb
from cuma.evaluate.choice import compute_metrics
from cuma.models import load_base_and_tokenizer

VARIANTS = {
    "base": {},  # the demo's settings: lr 5e-4 for everything
    "lr2e-3": {"learning_rate": 2e-3},  # a larger step size for every method
    "router1e-2": {"router_learning_rate": 1e-2},  # only the CuMA routers faster
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--methods", default="lora,cuma", help="methods per variant; VARIANT:METHOD pairs in --runs override")
    p.add_argument("--runs", default=None, help="explicit VARIANT:METHOD list, e.g. base:cuma,lr2e-3:lora")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--work", default="runs/demo_investigation")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    base_cfg = demo.DemoConfig(work=args.work)
    if args.steps:
        base_cfg.steps = args.steps
    work = Path(args.work)
    raw, prepared = work / "data" / "raw", work / "data" / "prepared"
    write_synthetic(raw, SynthConfig(participants=base_cfg.participants, questions=base_cfg.questions,
                                     modes=base_cfg.modes, countries=base_cfg.countries, seed=base_cfg.seed),
                    overwrite=True)
    prepare_wvb(load_wvb(raw), prepared, train_pairs=base_cfg.train_pairs, test_pairs=0, valid_pairs=160,
                seed=base_cfg.seed, overwrite=True)
    data = load_prepared(prepared)
    rows = []
    if args.runs:
        runs = [tuple(item.split(":")) for item in args.runs.split(",")]
    else:
        runs = [(v, m) for v in args.variants.split(",") for m in args.methods.split(",")]
    for variant, method in runs:
        cfg = dataclasses.replace(base_cfg, **VARIANTS[variant])
        t0 = time.perf_counter()
        out = work / variant / "adapters" / method
        demo._train(cfg, method, prepared, out)
        base, tok = load_base_and_tokenizer("smollm2-135m")
        res = demo._evaluate(cfg, method, out, base, tok, data, work / variant / f"eval_{method}", split="valid")
        m = compute_metrics(res["predictions"], per_question=False)
        row = {"variant": variant, "method": method, "accuracy": m["accuracy"], "emd": m["emd"]["mean"],
               "emd_expected": m["emd_expected"]["mean"], "entropy": m["entropy"],
               "seconds": round(time.perf_counter() - t0)}
        if method.startswith("cuma"):
            load = demo._cuma_expert_load(cfg, work / variant, tok, _as_test(data)) if method == "cuma" else None
            if load:
                mat = torch.tensor(list(load.values()))
                row["load_spread"] = float((mat.max(0).values - mat.min(0).values).mean())
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def _as_test(data):
    # the expert-load helper reads data.test; point it at the valid records
    return dataclasses.replace(data, test=data.valid)


if __name__ == "__main__":
    main()
