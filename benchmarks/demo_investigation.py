"""Why does (or doesn't) CuMA beat LoRA in `cuma demo`? Variants of the demo's training settings, compared on the
VALID split of the demo's synthetic population (the test split is never used to choose settings).

    python benchmarks/demo_investigation.py --runs base:lora,base:cuma [--steps 300 --eval-at 30,100,300]
    python benchmarks/demo_investigation.py --prepare-only --train-pairs 3000 --data runs/inv_data_3000
    python benchmarks/demo_investigation.py --data runs/inv_data_3000 --runs noprompt:cuma --json out.json

Each run trains one method with the demo's batch size and constant learning rate and, at every step of ``--eval-at``
(default: the last), scores the valid pairs and measures how far the routers separate the countries (spread of the
expert load between countries). One row per (run, step) is printed as JSON and collected in ``--json``. With a
constant learning rate the evaluation at step s of a longer run is the evaluation of an s-step run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from cuma import demo, methods
from cuma.data.records import load_prepared
from cuma.data.splits import prepare_wvb
from cuma.data.synthetic import SynthConfig, write_synthetic
from cuma.data.wvb import load_wvb
from cuma.evaluate.choice import compute_metrics
from cuma.evaluate.scoring import score_records
from cuma.models import load_tokenizer

# variant -> DemoConfig overrides ("cfg") and method option overrides ("options")
VARIANTS = {
    "base": {},  # the demo's settings: lr 5e-4 for everything, profile in the prompt
    "lr2e-3": {"cfg": {"learning_rate": 2e-3}},  # a larger step size for every parameter
    "router1e-2": {"cfg": {"router_learning_rate": 1e-2}},  # only the routers (and profile projection) faster
    "router5e-3": {"cfg": {"router_learning_rate": 5e-3}},
    "noprompt": {"options": {"profile_in_prompt": False}},  # the profile reaches the model only through the router
    "binit": {"options": {"init_weights": False}},  # random B: the routers get gradient from the first step
    "lr1e-3": {"cfg": {"learning_rate": 1e-3}},
    "b4lr2e-3": {"cfg": {"batch_size": 4, "learning_rate": 2e-3}},  # half the tokens per step (CPU budget)
    # the CPU demo's budget: adapters on the upper half of SmolLM2's 30 layers (no backward through the lower half)
    "top15lr2e-3": {"cfg": {"learning_rate": 2e-3}, "options": {"layers_to_transform": list(range(15, 30))}},
}


class ValidEval(TrainerCallback):
    """Scores the valid pairs (and the routers' country separation) at the chosen global steps."""

    def __init__(self, steps, tokenizer, data, profile_in_prompt: bool, uses_profile: bool, routed: bool, row: dict,
                 sink):
        self.steps, self.tokenizer, self.data = set(steps), tokenizer, data
        self.profile_in_prompt, self.uses_profile, self.routed = profile_in_prompt, uses_profile, routed
        self.row, self.sink, self.t0 = row, sink, time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step not in self.steps:
            return
        was_training = model.training
        model.eval()
        table = self.data.profile_embeds if self.uses_profile else None
        with torch.no_grad():
            preds = score_records(model, self.tokenizer, self.data.valid, batch_size=64, profile_table=table,
                                  profile_in_prompt=self.profile_in_prompt)
            m = compute_metrics(preds, per_question=False)
            row = {**self.row, "step": state.global_step, "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
                   "emd": m["emd"]["mean"], "emd_expected": m["emd_expected"]["mean"], "entropy": m["entropy"],
                   "seconds": round(time.perf_counter() - self.t0, 1)}
            if self.routed:
                load = demo.expert_load_by_country(model, self.tokenizer, self.data.valid, table, self.profile_in_prompt)
                mat = torch.tensor(list(load.values()))
                row["load_spread"] = round(float((mat.max(0).values - mat.min(0).values).mean()), 4)
                row["load_max"] = round(float(mat.mean(0).max()), 4)
        model.train(was_training)
        self.sink(row)


def prepare(cfg: demo.DemoConfig, folder: Path, valid_pairs: int) -> None:
    raw = folder / "raw"
    write_synthetic(raw, SynthConfig(participants=cfg.participants, questions=cfg.questions, modes=cfg.modes,
                                     countries=cfg.countries, seed=cfg.seed), overwrite=True)
    prepare_wvb(load_wvb(raw), folder / "prepared", train_pairs=cfg.train_pairs, test_pairs=0,
                valid_pairs=valid_pairs, seed=cfg.seed, overwrite=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="base:lora,base:cuma", help="VARIANT:METHOD list, e.g. base:cuma,lr2e-3:lora")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's)")
    p.add_argument("--eval-at", default=None, help="steps to evaluate at, e.g. 30,100,300 (default: the last)")
    p.add_argument("--train-pairs", type=int, default=None, help="default: the demo's")
    p.add_argument("--valid-pairs", type=int, default=160, help="valid pairs made by --prepare-only")
    p.add_argument("--valid-limit", type=int, default=None, help="score only the first N valid pairs")
    p.add_argument("--data", default=None, help="data folder (raw/ + prepared/); made here when missing")
    p.add_argument("--prepare-only", action="store_true")
    p.add_argument("--work", default="runs/demo_investigation")
    p.add_argument("--seed", type=int, default=0, help="training seed (the data keep the demo's seed 0)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    base_cfg = demo.DemoConfig(work=args.work)
    if args.steps:
        base_cfg.steps = args.steps
    if args.train_pairs:
        base_cfg.train_pairs = args.train_pairs
    work = Path(args.work)
    folder = Path(args.data) if args.data else work / "data"
    if not (folder / "prepared").is_dir():
        prepare(base_cfg, folder, args.valid_pairs)
    if args.prepare_only:
        return
    prepared = folder / "prepared"
    data = load_prepared(prepared)
    if args.valid_limit:
        data = dataclasses.replace(data, valid=data.valid[: args.valid_limit])
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    eval_at = [int(s) for s in args.eval_at.split(",")] if args.eval_at else [base_cfg.steps]
    if max(eval_at) > base_cfg.steps:
        sys.exit(f"--eval-at {max(eval_at)} is after the last step {base_cfg.steps}")
    rows = []

    def sink(row):  # every row is written at once, so a run cut short keeps what it measured
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(args.json).with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(rows, indent=2))
            tmp.replace(args.json)

    tok = load_tokenizer("smollm2-135m")
    for item in args.runs.split(","):
        variant, method = item.split(":")
        spec = VARIANTS[variant]
        cfg = dataclasses.replace(base_cfg, **spec.get("cfg", {}))
        cfg.seed = args.seed  # after the data were made: the seed of the training run only
        options = dict(spec.get("options", {}))
        if method == "lora":  # the routing options do not apply to LoRA
            options = {k: v for k, v in options.items()
                       if k in ("profile_in_prompt", "init_weights", "layers_to_transform")}
        pip = options.get("profile_in_prompt", True)
        uses_profile, routed = methods.get_spec(method).profile_routing, method.startswith("cuma")
        cb = ValidEval(eval_at, tok, data, profile_in_prompt=pip, uses_profile=uses_profile, routed=routed, row={"variant": variant, "method": method, "train_pairs": len(data.train),
                                           "seed": args.seed},
                       sink=sink)
        demo._train(cfg, method, prepared, work / variant / "adapters" / method, options=options, callbacks=[cb])


if __name__ == "__main__":
    main()
