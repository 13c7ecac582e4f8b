"""The distribution objective against per-respondent SFT at the same compute, on a prepared opinions folder.

Both runs train the same method with the same steps, batch size, learning rate and schedule (the same number of
forward/backward passes over prompts of the same template and length):

- ``distribution``: one example per training cell, the cross-entropy of the option-letter softmax against the cell's
  target (``train.objective: distribution``);
- ``respondents``: per-respondent SFT (``train.objective: sft``) on respondents drawn from each training cell's
  target distribution (``--respondents-per-cell`` each, seeded), every one with the group's profile: what a user of
  a per-respondent pipeline has to do with group-level data. On the synthetic population the cells' targets are the
  groups' true distributions, so these draws are distributed as the population's own respondents of the group.

Both are scored by ``cuma.evaluate.opinions_cli.evaluate_opinions`` on the same cells (default: the valid split),
beside the untrained persona row and the reference rows; wall time is the trainer's own train seconds.

    flock /tmp/cuma-heavy.lock python benchmarks/bench_opinions_objective.py --data DIR --json OUT.json \
        [--steps 40] [--batch-size 8] [--methods cuma] [--splits valid,test] [--reuse BENCH_OUT]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np


def write_respondents(data, out: Path, per_cell: int, seed: int) -> int:
    """A WVB-layout prepared folder (``cuma data wvb``'s files) of ``per_cell`` respondents per training cell, each
    answering with a letter drawn from the cell's target; profiles = the opinions folder's groups (same embeddings)."""
    from cuma.data.opinions import cell_to_record
    from cuma.data.records import write_jsonl
    from cuma.runinfo import atomic_write_json

    rng = np.random.default_rng(seed)
    records = []
    for cell in data.cells("train"):
        base = cell_to_record(cell, data.group_index[cell.group_id])
        answers = rng.choice(len(cell.options), size=per_cell, p=np.asarray(cell.target) / np.sum(cell.target))
        for j, k in enumerate(answers):
            rec = dict(base)
            for key in ("target", "weight", "cell_id", "group_id", "source", "cell_option_values"):
                rec.pop(key, None)
            rec.update(id=f"{cell.group_id}#r{j}:{cell.question_id}", participant_id=f"{cell.group_id}#r{j}",
                       gold_value=int(k) + 1,
                       gold_letter=base["letters"][int(k)])
            records.append(rec)
    random.Random(seed).shuffle(records)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    write_jsonl(out / "train.jsonl", records)
    write_jsonl(out / "valid.jsonl", [])
    write_jsonl(out / "test.jsonl", [])
    write_jsonl(out / "profiles.jsonl", [{"profile_index": i, "profile_text": g["profile_text"], "profile": g["group"]}
                                         for i, g in enumerate(data.groups)])
    shutil.copy(data.path / "profile_embeds.safetensors", out / "profile_embeds.safetensors")
    atomic_write_json(out / "manifest.json", {"kind": "wvb", "source": "respondents drawn from " + str(data.path),
                                              "respondents_per_cell": per_cell, "seed": seed})
    return len(records)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="prepared opinions folder")
    p.add_argument("--work", default="runs/bench-opinions-objective", help="adapters and the respondents folder")
    p.add_argument("--json", default=None, help="write the results to this file")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default="cuma")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--respondents-per-cell", type=int, default=None,
                   help="default: enough that both runs see every training example about once")
    p.add_argument("--splits", default="valid", help="comma-separated splits scored (valid: choosing; test: reporting)")
    p.add_argument("--reuse", default=None, help="a `cuma bench opinions` output folder: take its runs/<method> as the "
                   "distribution run (trained with the same budget) instead of training it again")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch

    from cuma.bench import BenchConfig, train_config
    from cuma.data.opinions import load_opinions
    from cuma.evaluate.opinions_cli import build_method, evaluate_opinions
    from cuma.models import load_base_and_tokenizer
    from cuma.runinfo import environment_record
    from cuma.train.sft import run_sft

    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = load_opinions(args.data)
    work = Path(args.work)
    train_cells = len(data.cells("train"))
    per_cell = args.respondents_per_cell or max(1, round(args.steps * args.batch_size / train_cells))
    n_resp = write_respondents(data, work / "respondents", per_cell, args.seed)
    cfg = BenchConfig(data=str(data.path), model=args.model, steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    rows, runs = {}, {}

    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    keys = ("cells", "js_distance", "total_variation", "w1_ordinal", "argmax_agreement")

    def score(name, adapter):
        base, tok = load_base_and_tokenizer(cfg.model)
        built, _ = build_method(name, adapter, base)
        out, results = {}, {}
        for split in splits:
            r = evaluate_opinions(built.model.eval(), tok, built, data, split=split, progress=False)
            results[split] = r
            for part in ("seen", "held_out"):
                out[f"{split}/{part}"] = {k: r["summary"][part][k] for k in keys}
        return out, results

    t0 = time.perf_counter()
    first = None
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        for objective in ("distribution", "respondents"):
            adapter = work / f"{method}-{objective}"
            if objective == "distribution" and args.reuse:
                adapter = Path(args.reuse) / "runs" / method
                run = json.loads((adapter / "run.json").read_text())
                if run["global_step"] != args.steps or Path(run["data"]["path"]).resolve() != data.path.resolve():
                    raise ValueError(f"--reuse {adapter}: trained {run['global_step']} steps on {run['data']['path']}, "
                                     f"not {args.steps} on {data.path}")
            else:
                run_cfg = train_config(cfg, method, adapter)
                if objective == "respondents":
                    run_cfg.data.path = str(work / "respondents")
                    run_cfg.train.objective = "sft"
                run = run_sft(run_cfg)
            key = f"{method} / {objective}"
            runs[key] = {"train_seconds": run["train_seconds"], "train_examples": run["train_records"],
                         "global_step": run["global_step"], "train_loss": run["train_loss"], "adapter": str(adapter)}
            rows[key], res = score(method, str(adapter))
            first = first or res
    rows["persona (untrained)"], _ = score("persona", None)
    for ref in ("uniform", "population_average", "nearest_groups"):
        rows[ref] = {f"{split}/{part}": {k: first[split]["summary"][part]["references"][ref][k] for k in keys}
                     for split in splits for part in ("seen", "held_out")}
    result = {"benchmark": "bench_opinions_objective", "data": str(data.path), "splits": splits,
              "steps": args.steps, "batch_size": args.batch_size, "train_cells": train_cells,
              "respondents_per_cell": per_cell, "respondent_examples": n_resp, "rows": rows, "training": runs,
              "seconds": round(time.perf_counter() - t0, 1), "environment": environment_record()}
    print(f"{'row':34s} {'part':15s} {'cells':>5s} {'JS':>7s} {'TV':>7s} {'W1':>7s} {'argmax':>7s} {'train s':>8s}")
    for name, r in rows.items():
        for part, b in r.items():
            if b["cells"]:
                fmt = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
                secs = runs.get(name, {}).get("train_seconds")
                print(f"{name:34s} {part:15s} {b['cells']:5d} {fmt(b['js_distance']):>7s} {fmt(b['total_variation']):>7s} "
                      f"{fmt(b['w1_ordinal']):>7s} {fmt(b['argmax_agreement']):>7s} {'' if secs is None else f'{secs:8.1f}'}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
