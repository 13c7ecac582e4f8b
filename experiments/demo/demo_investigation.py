"""Why does (or doesn't) CuMA beat LoRA in `cuma demo`, and what makes it learn who is asking faster? Variants of the
demo's training settings, measured on the VALID split of the demo's synthetic population (the test split is never
used to choose settings).

    python experiments/demo/demo_investigation.py --prepare-only --data runs/inv/data
    python experiments/demo/demo_investigation.py --data runs/inv/data --runs paper:cuma,paper:lora --steps 60 \\
        --eval-at 0,15,30,60 --json runs/inv/paper.json

Each run trains one method with the demo's data, batch size and constant learning rate; at every step of
``--eval-at`` it scores the valid pairs (seen countries, and held-out countries = zero-shot) and measures the
routers (``--diagnose``):

- per adapted layer, the RMS of the token part ``W_h h_t`` and of the profile part ``W_e e_d`` of the router's first
  pre-activation, and the spread of the profile part between profiles (its RMS after removing the mean profile);
- the gradient norms of the routers' first-layer token and profile weights (mean over the optimizer steps since the
  last evaluation);
- the country-level expert load: spread between seen countries (mean over experts of max - min of the mean gate)
  and, for each held-out country, whether its load is nearest to a country of its own zone.

One JSON row per (run, step) is printed and collected in ``--json``. With a constant learning rate the evaluation at
step s of a longer run is the evaluation of an s-step run.
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
from cuma.routing import Router, rms_normalise
from cuma.evaluate.topology import expert_load_by_group, routing_similarity
from cuma.train.callbacks import ValidationCurve

from _shared import valid_subset

# shared building blocks: a linear schedule at one lr, fast conditioning without / with the centred profile input,
# the upper half of the layers
def _lin(lr: float) -> dict:
    return {"learning_rate": lr, "lr_scheduler": "linear"}


_FAST = {"router_input_norm": "balanced", "router_token_init_scale": 0.1}
_FASTC = {**_FAST, "router_profile_center": "train"}
_TOP15 = list(range(15, 30))
_BF16 = {"dtype": "bfloat16", "attn_implementation": "eager", "split_by_length": 2}

# variant -> DemoConfig overrides ("cfg") and method option overrides ("options"; an option a method does not have
# does not apply to it and is dropped for that method, e.g. the routing options for LoRA)
VARIANTS = {
    "paper": {},  # the paper's CuMA: raw concat(h_t, e_d), default init
    "base": {},  # the 2026-11-28 name of "paper" (experiments/demo/demo_sweep_gpu.sh waves 1 and 2)
    "router5e-3": {"cfg": {"router_learning_rate": 5e-3}},
    "b4lr2e-3": {"cfg": {"batch_size": 4, "learning_rate": 2e-3}},
    "lr1e-3": {"cfg": {"learning_rate": 1e-3}},
    "lr2e-3": {"cfg": {"learning_rate": 2e-3}},
    "balanced": {"options": {"router_input_norm": "balanced"}},
    "balanced_g4": {"options": {"router_input_norm": "balanced", "router_profile_gain": 4.0}},
    "pinit": {"options": {"router_token_init_scale": 0.1}},
    "balanced_pinit": {"options": _FAST},
    "balanced_pinit0": {"options": {"router_input_norm": "balanced", "router_token_init_scale": 0.0}},
    "balanced_pinit_lr1e-3": {"cfg": {"learning_rate": 1e-3}, "options": _FAST},
    "balanced_pinit_lr2e-3": {"cfg": {"learning_rate": 2e-3}, "options": _FAST},
    "balanced_pinit0_lr2e-3": {"cfg": {"learning_rate": 2e-3},
                               "options": {"router_input_norm": "balanced", "router_token_init_scale": 0.0}},
    "balanced_pinit_top1_lr2e-3": {"cfg": {"learning_rate": 2e-3},
                                   "options": {**_FAST, "top_k": 1}},
    "balanced_pinit_nobal_lr2e-3": {"cfg": {"learning_rate": 2e-3},
                                    "options": {**_FAST, "balance_loss_coef": 0.0}},
    "lin_lr5e-4": {"cfg": _lin(5e-4)},
    "lin_lr1e-3": {"cfg": _lin(1e-3)},
    "lin_lr2e-3": {"cfg": _lin(2e-3)},
    "lin_paper_lr2e-3": {"cfg": _lin(2e-3)},  # the paper's router
    "lin_fast_lr1e-3": {"cfg": _lin(1e-3), "options": _FAST},
    "lin_fast_lr2e-3": {"cfg": _lin(2e-3), "options": _FAST},
    "balanced_top1": {"options": {"router_input_norm": "balanced", "top_k": 1}},
    "balanced_pinit_lr1e-3_top1": {"cfg": {"learning_rate": 1e-3},
                                   "options": {**_FAST, "top_k": 1}},
    "balanced_g2": {"options": {"router_input_norm": "balanced", "router_profile_gain": 2.0}},
    "noprompt": {"options": {"profile_in_prompt": False}},
    "binit": {"options": {"init_weights": False}},
    # adapting only the upper half of the layers (15-29) for every method: the backward pass stops at layer 15
    "top15_lin_lr1e-3": {"cfg": _lin(1e-3), "options": {"layers_to_transform": _TOP15}},
    "top15_lin_lr2e-3": {"cfg": _lin(2e-3), "options": {"layers_to_transform": _TOP15}},
    "top15_lin_fast_lr2e-3": {"cfg": _lin(2e-3), "options": {**_FAST, "layers_to_transform": _TOP15}},
    # fast conditioning + the routers' profile input centred on the training profiles' mean (the demo's since the
    # second round), and variations of it
    "lin_fastc_lr2e-3": {"cfg": _lin(2e-3), "options": _FASTC},
    "lin_fastc_lr3e-3": {"cfg": _lin(3e-3), "options": _FASTC},
    "lin_fastc_noprompt_lr2e-3": {"cfg": _lin(2e-3), "options": {**_FASTC, "profile_in_prompt": False}},
    "lin_fastc_noprompt_lr3e-3": {"cfg": _lin(3e-3), "options": {**_FASTC, "profile_in_prompt": False}},
    "lin_fastc_g2_lr2e-3": {"cfg": _lin(2e-3), "options": {**_FASTC, "router_profile_gain": 2.0}},
    # fourth round: a learning-rate split for the fast-conditioned routers (3x and 10x the main lr)
    "lin_fastc_rlr6e-3_lr2e-3": {"cfg": {**_lin(2e-3), "router_learning_rate": 6e-3}, "options": _FASTC},
    "lin_fastc_rlr2e-2_lr2e-3": {"cfg": {**_lin(2e-3), "router_learning_rate": 2e-2}, "options": _FASTC},
    # fifth round: the routers' hidden width at the paper's bottleneck ratio ((4096 + 384) -> 256 on Qwen3-8B is
    # 17.5x; (576 + 384) -> 64 on SmolLM2 is 15x) instead of the paper's absolute 256 (a 3.75x bottleneck here)
    "lin_fastc_rlr6e-3_rh64_lr2e-3": {"cfg": {**_lin(2e-3), "router_learning_rate": 6e-3},
                                      "options": {**_FASTC, "router_hidden": 64}},
    # every batch as 2 micro-batches of similar length (train.split_by_length; the demo's since the fifth round)
    "lin_lr1e-3_split2": {"cfg": {**_lin(1e-3), "split_by_length": 2}},
    "lin_fastc_rlr6e-3_lr2e-3_split2": {"cfg": {**_lin(2e-3), "router_learning_rate": 6e-3, "split_by_length": 2},
                                        "options": _FASTC},
    # sixth round: the routers read the centred profile on the training profiles' 32 leading principal directions
    # (router_profile_subspace; 99.8% of the training profiles' variance, about half of a held-out profile's norm
    # lies outside them)
    "lin_fastc_rlr6e-3_sub32_lr2e-3": {"cfg": {**_lin(2e-3), "router_learning_rate": 6e-3},
                                       "options": {**_FASTC, "router_profile_subspace": 32}},
    "lin_fastc_rlr6e-3_sub16_lr2e-3": {"cfg": {**_lin(2e-3), "router_learning_rate": 6e-3},
                                       "options": {**_FASTC, "router_profile_subspace": 16}},
    # tenth round: LoRA+ (the adapters' B matrices at 4x / 8x / 16x the learning rate), for every method alike
    **{f"lin_lr{lr}_split2_lp{k}": {"cfg": {**_lin(float(lr)), "split_by_length": 2, "loraplus_lr_ratio": float(k)}}
       for lr in ("5e-4", "1e-3") for k in (4, 8, 16)},
    **{f"lin_fastc_rlr6e-3_lr{lr}_split2_lp{k}": {
        "cfg": {**_lin(float(lr)), "router_learning_rate": 6e-3, "split_by_length": 2, "loraplus_lr_ratio": float(k)},
        "options": _FASTC} for lr in ("1e-3", "2e-3") for k in (4, 8, 16)},
    # tenth round: the demo's CuMA with the profile out of its prompt (the paper's "profile not in the prompt"
    # ablation: CuMA reads who is asking through its routers only)
    "lin_fastc_rlr6e-3_lr2e-3_split2_noprompt": {
        "cfg": {**_lin(2e-3), "router_learning_rate": 6e-3, "split_by_length": 2},
        "options": {**_FASTC, "profile_in_prompt": False}},
    # eleventh round: batch 4 at twice the steps instead of batch 8 split in two micro-batches of 4 (the same rows
    # and about the same compute: every forward is 4 rows either way), for every method alike: twice the updates
    "lin_lr1e-3_b4": {"cfg": {**_lin(1e-3), "batch_size": 4}},
    "lin_fastc_rlr6e-3_lr2e-3_b4": {"cfg": {**_lin(2e-3), "router_learning_rate": 6e-3, "batch_size": 4},
                                    "options": _FASTC},
    # seventh round: the frozen base in bf16 with eager attention, for every method alike (about 0.66x the step
    # time on this CPU, benchmarks/bench_demo_dtype.py), to buy more steps within the budget
    "bf16_lin_lr1e-3": {"cfg": {**_lin(1e-3), **_BF16}},
    "bf16_lin_lr5e-4": {"cfg": {**_lin(5e-4), **_BF16}},
    "bf16_lin_fastc_rlr6e-3_lr2e-3": {"cfg": {**_lin(2e-3), "router_learning_rate": 6e-3, **_BF16}, "options": _FASTC},
    "bf16_lin_paper_rlr6e-3_lr2e-3": {"cfg": {**_lin(2e-3), "router_learning_rate": 6e-3, **_BF16}},  # paper router
    "b16": {"cfg": {"batch_size": 16}},
    "b16_balanced_pinit": {"cfg": {"batch_size": 16}, "options": _FAST},
}


class RouterDiagnostics(TrainerCallback):
    """Router gradient norms per optimizer step (token part and profile part of the first layer's weights)."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        tok, prof = [], []
        for r in routers(model):
            g = r.layers[0].weight.grad
            if g is None:
                continue
            tok.append(float(g[:, : r.in_features].norm()))
            if r.profile_dim:
                prof.append(float(g[:, r.in_features :].norm()))
        if tok:
            self.steps.append({"grad_token": sum(tok) / len(tok), "grad_profile": sum(prof) / len(prof) if prof else None})

    def take(self) -> dict:
        rows, self.steps = self.steps, []
        out = {}
        for key in ("grad_token", "grad_profile"):
            vals = [r[key] for r in rows if r[key] is not None]
            out[key] = sum(vals) / len(vals) if vals else None
        return out


def routers(model):
    return [m for m in model.modules() if isinstance(m, Router)]


def router_input_parts(model, tokenizer, records, table, profile_in_prompt: bool) -> dict:
    """Per routed layer (in model order): RMS of the token part and of the profile part of the first
    pre-activation on ``records`` (non-pad tokens), and the between-profile spread of the profile part."""
    from cuma.data.prompts import render_prompt

    stats = []

    def hook(module, args):
        hidden, profile = args[0], (args[1] if len(args) > 1 else None)
        w = module.layers[0].weight
        h = hidden.to(w.dtype)
        if module.input_norm == "balanced":
            h = rms_normalise(h) * module.token_gain
        tok = torch.nn.functional.linear(h, w[:, : module.in_features])
        row = {"token_rms": float(tok[mask_now].pow(2).mean().sqrt())}
        if module.profile_dim and profile is not None:
            pe = profile.to(w.dtype)
            if module.input_norm == "balanced":
                pe = rms_normalise(pe) * module.profile_gain
            prof = torch.nn.functional.linear(pe, w[:, module.in_features :])
            row["profile_rms"] = float(prof.pow(2).mean().sqrt())
            row["profile_spread"] = float((prof - prof.mean(0, keepdim=True)).pow(2).mean().sqrt())
            row["token_spread"] = float((tok[mask_now] - tok[mask_now].mean(0, keepdim=True)).pow(2).mean().sqrt())
        stats.append(row)

    device = next(model.parameters()).device
    texts = [render_prompt(r, tokenizer, profile_in_prompt=profile_in_prompt) for r in records]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    mask_now = enc["attention_mask"].bool()
    extra = {}
    if table is not None:
        extra["profile_embeds"] = table[torch.as_tensor([r["profile_index"] for r in records])].to(device)
    handles = [r.register_forward_pre_hook(hook) for r in routers(model)]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(**enc, **extra)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return stats


def load_summary(model, tokenizer, data, table, profile_in_prompt: bool, zone_of: dict, per_country: int) -> dict:
    """Country-level routing: spread of the per-layer expert load between seen countries (mean over layers and
    experts of max - min), mean routing similarity within / across zones, and for each held-out country whether the
    seen country it is routed most alike is of its own zone."""
    per_layer = expert_load_by_group(model, tokenizer, data.valid, profile_table=table,
                                     profile_in_prompt=profile_in_prompt, per_group=per_country, per_layer=True)
    countries, sim = routing_similarity(per_layer)
    layers = sorted(next(iter(per_layer.values())))
    seen = [c for c in countries if c not in HELD]
    spread = []
    for name in layers:
        mat = torch.tensor([per_layer[c][name] for c in seen])
        spread.append(float((mat.max(0).values - mat.min(0).values).mean()))
    out = {"load_spread": round(sum(spread) / len(spread), 4)}
    pos = {c: i for i, c in enumerate(countries)}
    within = [sim[pos[a]][pos[b]] for a in seen for b in seen if a < b and zone_of[a] == zone_of[b]]
    across = [sim[pos[a]][pos[b]] for a in seen for b in seen if a < b and zone_of[a] != zone_of[b]]
    if within and across:
        out["routing_sim_within_zone"] = round(sum(within) / len(within), 4)
        out["routing_sim_across_zones"] = round(sum(across) / len(across), 4)
    hits = []
    for c in HELD:
        if c in pos:
            nearest = max(seen, key=lambda s: sim[pos[c]][pos[s]])
            hits.append(zone_of.get(nearest) == zone_of.get(c))
    if hits:
        out["held_out_nearest_same_zone"] = sum(hits) / len(hits)
    return out


HELD: list[str] = []


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="paper:lora,paper:cuma", help="VARIANT:METHOD list, e.g. paper:cuma,lr2e-3:lora")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's)")
    p.add_argument("--eval-at", default=None, help="steps to evaluate at, e.g. 0,15,30,60 (default: the last)")
    p.add_argument("--train-pairs", type=int, default=None, help="default: the demo's")
    p.add_argument("--valid-pairs", type=int, default=300, help="seen-country valid pairs made by --prepare-only")
    p.add_argument("--held-out-valid-pairs", type=int, default=100, help="held-out-country valid pairs")
    p.add_argument("--data", default=None, help="data folder (raw/ + prepared/); made here when missing")
    p.add_argument("--prepare-only", action="store_true")
    p.add_argument("--diagnose", action="store_true", help="router input parts, gradient norms, expert load")
    p.add_argument("--valid-limit", type=int, default=None, help="score only the first N seen + N/2 held-out pairs")
    p.add_argument("--load-prompts", type=int, default=4, help="prompts per country for the routing diagnostics")
    p.add_argument("--work", default="runs/demo_investigation")
    p.add_argument("--seed", type=int, default=0, help="training seed (the data keep the demo's seed 0)")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--mode-layout", default="random", choices=("map", "random"), help="the population's answer layout")
    p.add_argument("--country-strength", type=float, default=None)
    p.add_argument("--answer-width", type=float, default=None)
    p.add_argument("--answer-noise", type=float, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    # variants start from the paper's CuMA router, one constant lr 5e-4 for every method and no router lr split
    # (the earlier demo's training settings) and add their changes explicitly
    base_cfg = demo.DemoConfig(work=args.work, seed=args.data_seed, valid_pairs=args.valid_pairs,
                               held_out_valid_pairs=args.held_out_valid_pairs, conditioning="paper",
                               mode_layout=args.mode_layout, learning_rate=5e-4, lr_scheduler="constant",
                               method_learning_rates={}, router_learning_rate=None, split_by_length=1,
                               dtype="float32", attn_implementation=None)
    for name in ("country_strength", "answer_width", "answer_noise"):
        if getattr(args, name) is not None:
            setattr(base_cfg, name, getattr(args, name))
    if args.steps:
        base_cfg.steps = args.steps
    if args.train_pairs:
        base_cfg.train_pairs = args.train_pairs
    work = Path(args.work)
    folder = Path(args.data) if args.data else work / "data"
    if not (folder / "prepared").is_dir():
        demo.prepare_data(base_cfg, folder)
    if args.prepare_only:
        return
    prepared = folder / "prepared"
    data = load_prepared(prepared)
    truth = json.loads((folder / "raw" / "truth.json").read_text())
    zone_of = {c: v.get("zone") for c, v in truth["countries"].items()}
    HELD[:] = sorted({r["profile"]["country"] for r in data.valid if r["held_out"]})
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

    from cuma.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    probe = [r for r in data.valid if not r["held_out"]][:16]
    if args.valid_limit:
        data = dataclasses.replace(data, valid=valid_subset(data.valid, args.valid_limit))
    for item in args.runs.split(","):
        variant, method = item.split(":")
        spec = VARIANTS[variant]
        cfg = dataclasses.replace(base_cfg, **spec.get("cfg", {}))
        cfg.seed = args.seed  # after the data were made: the seed of the training run only
        options = dict(spec.get("options", {}))
        accepted = methods.get_spec(method).options  # e.g. no routing options for LoRA, no profile ones for semantic
        options = {k: v for k, v in options.items() if k in accepted}
        pip = options.get("profile_in_prompt", True)
        uses_profile = methods.get_spec(method).profile_routing
        table = data.profile_embeds if uses_profile else None
        routed = method.startswith("cuma")
        grads = RouterDiagnostics()
        t0 = time.perf_counter()

        def extra(model, _table=table, _pip=pip, _routed=routed, _grads=grads):
            out = {"seconds": round(time.perf_counter() - t0, 1)}
            if args.diagnose and _routed:
                parts = router_input_parts(model, tok, probe, _table, _pip)
                out["router_parts"] = parts
                for key in ("token_rms", "profile_rms", "profile_spread", "token_spread"):
                    vals = [s[key] for s in parts if key in s]
                    if vals:
                        out[f"mean_{key}"] = round(sum(vals) / len(vals), 4)
                out.update(_grads.take())
                out.update(load_summary(model, tok, data, _table, _pip, zone_of, args.load_prompts))
            return out

        curve = ValidationCurve(
            eval_at, tok, data.valid, profile_table=table, profile_in_prompt=pip, batch_size=64,
            sink=lambda row, v=variant, m=method: sink({"variant": v, "method": m, "seed": args.seed,
                                                       "train_pairs": len(data.train), **row}),
            extra=extra,
        )
        callbacks = [curve] + ([grads] if args.diagnose and routed else [])
        demo.train_method(cfg, method, prepared, work / variant / "adapters" / method, options=options, callbacks=callbacks)


if __name__ == "__main__":
    main()
