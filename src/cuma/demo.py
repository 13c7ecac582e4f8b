"""`cuma demo`: the main job on the embedded offline defaults (SmolLM2-135M, MiniLM, the synthetic population).

The recipe reads top to bottom in :func:`run_demo`:

1. generate a synthetic population of real countries from five Inglehart-Welzel cultural zones whose latent
   cultural modes conflict, and prepare pairs with one country of every zone held out of training (its test pairs
   measure zero-shot transfer to an unseen country of a known zone);
2. train LoRA, semantic-only CuMA and CuMA with the same budget (conditional SFT, profile in the prompt), scoring
   valid pairs during training for the learning curves;
3. evaluate them and the untrained model with the persona prompt on the same test pairs;
4. write ``report/``: ``report.md`` (the comparison table beside the population's oracle figures), PNG figures
   (metrics, answer distributions, learning curves, the routing map) and ``results.json`` with every number.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import torch

from .runinfo import atomic_write_text, environment_record

METHOD_COLORS = {"persona": "#999999", "lora": "#4c72b0", "cuma-semantic": "#dd8452", "cuma": "#55a868"}
METHOD_LABELS = {
    "persona": "untrained + persona prompt",
    "lora": "LoRA",
    "cuma-semantic": "semantic-only CuMA",
    "cuma": "CuMA",
}


# the demo's population: five Inglehart-Welzel zones that a sentence encoder tells apart, four countries each
DEMO_ZONES = ("Protestant Europe", "Orthodox Europe", "Confucian", "African-Islamic", "Latin America")
DEMO_PROFILE_FIELDS = ("B_COUNTRY", "X003R", "Q260", "Q289")  # country, age group, gender, religion


@dataclass
class DemoConfig:
    out: str = "report"
    work: str = "runs/demo"
    seed: int = 0
    quick: bool = False
    # synthetic population (cuma.data.synthetic.SynthConfig)
    participants: int = 2000
    questions: int = 8
    modes: int = 5
    zones: tuple = DEMO_ZONES
    countries: int = 20
    country_set: str = "zones"
    # a population whose groups answer distinctly (valid oracle ~80% vs mean collapse ~45%, docs/demo.md section 4):
    # the conditional structure is then learnable in the demo's budget, for every method alike
    country_strength: float = 4.0
    answer_width: float = 0.7
    answer_noise: float = 0.04
    mode_layout: str = "random"
    profile_fields: tuple = DEMO_PROFILE_FIELDS
    held_out_per_zone: int = 1  # whole countries held out of training, from every zone (zero-shot)
    # pairs: test = seen-country pairs plus held-out-country pairs; the valid pairs draw the learning curves
    # 100 + 100 test pairs and 24 + 8 learning-curve pairs (were 160 + 100 and 32 + 16) keep the run inside 20 minutes
    # on a slow day of the shared 2-core machine (docs/demo.md section 3); settings were chosen on a larger valid set
    train_pairs: int = 960
    test_pairs: int = 100
    held_out_test_pairs: int = 100
    valid_pairs: int = 24  # the learning curves' pairs
    held_out_valid_pairs: int = 8
    # training: the same budget for every method
    methods: list[str] = field(default_factory=lambda: ["lora", "cuma-semantic", "cuma"])
    # 50 rather than 40 (valid split of both seeds' populations): wider EMD and entropy margins over LoRA, about
    # the same accuracy margin; ~2.5 more CPU minutes (docs/demo.md section 2)
    steps: int = 50
    batch_size: int = 8
    learning_rate: float = 2e-3
    # per-method learning rates where a method's best on the valid split differs (docs/demo.md section 2)
    method_learning_rates: dict = field(default_factory=lambda: {"lora": 1e-3})
    lr_scheduler: str = "linear"  # decays to 0 over the steps (valid split: better end points for every method)
    # the routers (both CuMA variants; LoRA has none) learn at 3x the main lr: on the valid split of both populations,
    # with two training seeds each, CuMA's accuracy rose in 4 of 4 runs, zero-shot in 3, entropy fell in 4
    # (docs/demo.md section 2, fourth round); None: the main lr
    router_learning_rate: Optional[float] = 6e-3
    # LoRA+: every method's B matrices at this multiple of its learning rate (None: the same lr as A). Off: on the
    # valid split it lowered CuMA's zero-shot accuracy (4x) and LoRA's seen accuracy (4x, 16x) (docs/demo.md, tenth round)
    loraplus_lr_ratio: Optional[float] = None
    conditioning: str = "fast"  # CuMA's router: "fast" (CUMA_FAST_OPTIONS) or "paper" (the paper's raw concat)
    curve_points: int = 2  # valid evaluations during training (the learning-curve figure); 0: none
    # 16, not 32: on this CPU a forward of 8-16 prompts costs less per prompt than one of 32 or 64 (the same
    # scores; benchmarks/bench_eval_batch.py)
    eval_batch_size: int = 16
    # every training batch runs as 2 micro-batches of similar length, each padded only to its own longest row: the
    # same rows and task-loss gradient per step, ~7% fewer tokens (train.split_by_length, benchmarks/bench_length_split.py)
    split_by_length: int = 2
    # the frozen base's precision, for every method alike (trainable adapter weights stay fp32). "auto" is bfloat16
    # where the CPU / GPU multiplies bf16 natively (cuma.models.native_bf16): with eager attention 0.66x the step time
    # on an AVX512-BF16 CPU, but 19-33x on one without (benchmarks/bench_demo_dtype.py, docs/demo.md seventh round),
    # so the default stays float32: the demo's budget must hold on either machine
    dtype: str = "float32"
    attn_implementation: Optional[str] = None

    def quick_version(self) -> "DemoConfig":
        small = dict(participants=400, questions=4, countries=10, train_pairs=24, test_pairs=16, held_out_test_pairs=8,
                     valid_pairs=8, held_out_valid_pairs=4, steps=3, batch_size=4, curve_points=1)
        return DemoConfig(**{**asdict(self), **small, "quick": True})

    def synth_config(self):
        from .data.synthetic import SynthConfig

        return SynthConfig(participants=self.participants, questions=self.questions, modes=self.modes,
                           countries=self.countries, country_set=self.country_set, zones=tuple(self.zones),
                           profile_fields=tuple(self.profile_fields), country_strength=self.country_strength,
                           mode_layout=self.mode_layout if self.country_set == "zones" else "random",
                           answer_width=self.answer_width, answer_noise=self.answer_noise, seed=self.seed)


def held_out_countries(truth: dict, per_zone: int, seed: int) -> list[str]:
    """``per_zone`` countries of every zone (seeded), or of the invented set, held out of training."""
    import numpy as np

    rng = np.random.default_rng([seed, 77])
    by_zone: dict = {}
    for name, info in truth["countries"].items():
        by_zone.setdefault(info.get("zone"), []).append(name)
    held = []
    for zone in sorted(by_zone, key=str):
        names = sorted(by_zone[zone])
        if len(names) <= per_zone:
            raise ValueError(f"zone {zone!r} has {len(names)} countries: cannot hold out {per_zone} and train on the rest")
        held += [names[i] for i in sorted(rng.choice(len(names), size=per_zone, replace=False))]
    return held


def prepare_data(cfg: DemoConfig, folder: Path) -> tuple[Path, dict, list[str]]:
    """The demo's data: the synthetic population in ``folder/raw`` and its prepared pairs in ``folder/prepared``
    (held-out countries out of training; valid and test stratified into seen and held-out countries)."""
    from .data.splits import prepare_wvb
    from .data.synthetic import load_truth, write_synthetic
    from .data.wvb import load_wvb

    raw = folder / "raw"
    write_synthetic(raw, cfg.synth_config(), overwrite=True)
    truth = load_truth(raw / "truth.json")
    held = held_out_countries(truth, cfg.held_out_per_zone, cfg.seed)
    prepared = folder / "prepared"
    prepare_wvb(
        load_wvb(raw), prepared, train_pairs=cfg.train_pairs, test_pairs=cfg.test_pairs, valid_pairs=cfg.valid_pairs,
        seed=cfg.seed, holdout_countries=held, holdout_test_keeps_seen=True,
        held_out_pairs={"test": cfg.held_out_test_pairs, "valid": cfg.held_out_valid_pairs}, overwrite=True,
    )  # fmt: skip
    return prepared, truth, held


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    parser.add_argument("--quick", action="store_true", help="smoke version (~2 minutes): tiny data, 3 steps")
    parser.add_argument("--out", default=d.out, help="report folder (default: report)")
    parser.add_argument("--work", default=d.work, help="folder for data, adapters and evaluations")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the population, the split and training")
    parser.add_argument("--steps", type=int, default=None, help=f"training steps per method (default {d.steps})")
    parser.add_argument("--batch-size", type=int, default=None, help=f"default {d.batch_size}")
    parser.add_argument("--learning-rate", type=float, default=None, help=f"default {d.learning_rate}")
    parser.add_argument("--method-learning-rate", action="append", default=None, metavar="METHOD=LR",
                        help="learning rate of one method (repeatable), e.g. lora=5e-4; --learning-rate sets the rest "
                        f"(default {d.method_learning_rates or 'none'})")
    parser.add_argument("--lr-scheduler", choices=("constant", "linear", "cosine"), default=None,
                        help=f"learning-rate schedule over the steps (default {d.lr_scheduler})")
    parser.add_argument("--router-learning-rate", type=float, default=None,
                        help=f"learning rate of the routers of both CuMA variants (default {d.router_learning_rate:g}; "
                        "pass the main learning rate for no split)")
    parser.add_argument("--loraplus-lr-ratio", type=float, default=None,
                        help="LoRA+: every method's B matrices learn at this multiple of its learning rate (default: "
                        "off, the same lr as A; docs/demo.md tenth round)")
    parser.add_argument("--conditioning", choices=("fast", "paper"), default=None,
                        help="CuMA's router: 'fast' (balanced router inputs, profile-led initial routing, profile input "
                        "centred on the training profiles; the default) or 'paper' (the paper's raw concat(h_t, e_d))")
    parser.add_argument("--split-by-length", type=int, default=None,
                        help=f"run every training batch as this many micro-batches of similar length (default "
                        f"{d.split_by_length}; 1: whole batches)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default=None,
                        help=f"the frozen base's precision for every method (default {d.dtype}; auto: bfloat16 where "
                        "the CPU / GPU has native bf16, else float32; adapter weights stay float32)")
    parser.add_argument("--train-pairs", type=int, default=None, help=f"default {d.train_pairs}")
    parser.add_argument("--test-pairs", type=int, default=None, help=f"seen-country test pairs (default {d.test_pairs})")
    parser.add_argument("--held-out-test-pairs", type=int, default=None,
                        help=f"held-out-country test pairs (default {d.held_out_test_pairs})")


def run(args: argparse.Namespace) -> int:
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    cfg = DemoConfig(out=args.out, work=args.work, seed=args.seed)
    if args.quick:
        cfg = cfg.quick_version()
    for name in ("steps", "batch_size", "learning_rate", "router_learning_rate", "loraplus_lr_ratio", "split_by_length",
                 "train_pairs", "test_pairs", "held_out_test_pairs"):
        value = getattr(args, name)
        if value is not None:
            if value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
            setattr(cfg, name, value)
    if args.conditioning is not None:
        cfg.conditioning = args.conditioning
    if args.dtype is not None:
        cfg.dtype = args.dtype
    if args.learning_rate is not None and args.method_learning_rate is None:
        cfg.method_learning_rates = {}  # one learning rate for every method
    for item in args.method_learning_rate or ():
        cfg.method_learning_rates = {**cfg.method_learning_rates, **_method_lr(item, cfg.methods)}
    if args.lr_scheduler is not None:
        cfg.lr_scheduler = args.lr_scheduler
    run_demo(cfg)
    return 0


def _method_lr(item: str, methods: list[str]) -> dict:
    name, sep, value = item.partition("=")
    if not sep or name not in methods:
        raise ValueError(f"--method-learning-rate must be METHOD=LR with METHOD one of {methods}, got {item!r}")
    try:
        lr = float(value)
    except ValueError:
        lr = -1.0
    if not lr > 0:
        raise ValueError(f"--method-learning-rate {name}: the learning rate must be a positive number, got {value!r}")
    return {name: lr}


class _Progress:
    def __init__(self, total: int) -> None:
        self.total, self.step, self.t0 = total, 0, time.perf_counter()

    def __call__(self, text: str) -> None:
        self.step += 1
        print(f"[{self.step}/{self.total} {time.perf_counter() - self.t0:6.0f}s] {text}", flush=True)


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    from .data.records import load_prepared
    from .data.synthetic import oracle_metrics
    from .evaluate.topology import RoutingAccumulator
    from .models import emulated_bf16_note, resolve_dtype_name

    # the resolved precision is what the report and results.json record
    cfg = replace(cfg, dtype=resolve_dtype_name(cfg.dtype, _device(), option="--dtype"))
    note = emulated_bf16_note(cfg.dtype, _device())
    if note:
        warnings.warn(f"--dtype: {note}", stacklevel=2)
    work, out = Path(cfg.work), Path(cfg.out)
    progress = _Progress(total=4 + 2 * len(cfg.methods))
    torch.manual_seed(cfg.seed)

    # 1. data
    progress(f"synthetic population: {cfg.participants} participants in {cfg.countries} countries, "
             f"{cfg.questions} questions, {cfg.modes} modes")
    prepared, truth, held = prepare_data(cfg, work / "data")
    data = load_prepared(prepared)
    seen_test = [r for r in data.test if not r["held_out"]]
    held_test = [r for r in data.test if r["held_out"]]
    oracle = {"seen": oracle_metrics(seen_test, truth), "held_out": oracle_metrics(held_test, truth) if held_test else None}
    base, tokenizer = _load_base(cfg)

    # 2. training, the same budget for every method; valid pairs scored along the way (learning curves)
    steps = curve_steps(cfg.steps, cfg.curve_points)
    runs: dict[str, dict] = {}
    curves: dict[str, list] = {}
    for method in cfg.methods:
        progress(f"training {METHOD_LABELS.get(method, method)}: {cfg.steps} steps x batch {cfg.batch_size}")
        curve = _curve(cfg, method, tokenizer, data, steps)
        runs[method] = _train(cfg, method, prepared, work / "adapters" / method, callbacks=[curve] if curve else None)
        curves[method] = curve.rows if curve else []

    # 3. evaluation on the same test pairs (and the untrained model's point of the learning curves)
    results: dict[str, dict] = {}
    progress("evaluating the untrained model with the persona prompt")
    results["persona"] = _evaluate(cfg, "persona", None, base, tokenizer, data, work / "eval" / "persona")
    if steps:
        curves["persona"] = [_curve(cfg, "persona", tokenizer, data, [0]).evaluate(base, 0)]
    routing = None
    for method in cfg.methods:
        progress(f"evaluating {METHOD_LABELS.get(method, method)}")
        base, _ = _load_base(cfg)
        # CuMA's routing map is pooled from the gates of its test evaluation (no forward of its own)
        loads = RoutingAccumulator(data.test) if method == "cuma" else None
        results[method] = _evaluate(cfg, method, work / "adapters" / method, base, tokenizer, data,
                                    work / "eval" / method, routing=loads)
        if loads is not None:
            routing = routing_map(loads.stats(), held)

    # 4. report
    progress(f"writing {out}/")
    for method, run_record in runs.items():  # counted when training (a reloaded adapter is frozen)
        results[method]["table"]["trainable_parameters"] = run_record["method"]["trainable_parameters"]
        results[method]["table"]["trainable_share"] = (
            run_record["method"]["trainable_parameters"] / run_record["method"]["base_parameters"]
        )
    results["persona"]["table"].update(trainable_parameters=0, trainable_share=0.0)
    summary = {
        "config": asdict(cfg),
        "held_out_countries": held,
        "zones": {c: v.get("zone") for c, v in truth["countries"].items()},
        "test_pairs": {"seen": len(seen_test), "held_out": len(held_test)},
        "valid_pairs": {"seen": sum(not r["held_out"] for r in data.valid),
                        "held_out": sum(bool(r["held_out"]) for r in data.valid)},
        "oracle": oracle,
        "results": {m: r["table"] for m, r in results.items()},
        "claims": demo_claims(results, seed=cfg.seed),
        "training": {m: {k: runs[m][k] for k in ("train_seconds", "train_loss", "global_step")} for m in runs},
        "cuma_options": {m: runs[m]["method"]["options"] for m in runs if m.startswith("cuma")},
        "learning_curves": curves,
        "routing": routing,
        "environment": environment_record(),
        "wall_seconds": round(time.perf_counter() - progress.t0, 1),  # start to report (the report's writing aside)
    }
    _write_report(cfg, out, summary, results, truth, routing)
    progress("done")
    print(f"\n{(out / 'report.md').read_text()}")
    return summary


def _load_base(cfg: DemoConfig):
    """The demo's frozen base and tokenizer, in the demo's precision and attention (``cfg.dtype`` resolved)."""
    from .models import load_base_and_tokenizer, resolve_dtype_name

    extra = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    return load_base_and_tokenizer("smollm2-135m", dtype=resolve_dtype_name(cfg.dtype, _device()), **extra)


def curve_steps(steps: int, points: int) -> list[int]:
    """``points`` evenly spaced steps ending at ``steps`` (the learning curve's evaluations)."""
    if points <= 0:
        return []
    return sorted({max(1, round(steps * (i + 1) / points)) for i in range(points)})


def _curve(cfg: DemoConfig, method: str, tokenizer, data, steps):
    from . import methods
    from .train.callbacks import ValidationCurve

    if not steps or not data.valid:
        return None
    spec = methods.get_spec(method)
    table = data.profile_embeds if spec.profile_routing else None
    return ValidationCurve(steps, tokenizer, data.valid, profile_table=table, profile_in_prompt=True,
                           batch_size=cfg.eval_batch_size)


# ------------------------------------------------------------------------------------------------------ training
# CuMA's fast conditioning (chosen on the valid split, docs/demo.md): balanced router inputs, a profile-led
# initial routing, and the profile input centred on the training profiles' mean. "paper" keeps the paper's router
# (raw concat, default init).
CUMA_FAST_OPTIONS = {"router_input_norm": "balanced", "router_token_init_scale": 0.1, "router_profile_center": "train"}


def has_routers(method: str) -> bool:
    """Whether the method's layers route (the mixtures of experts: both CuMA variants, HydraLoRA, MixLoRA)."""
    from . import methods

    return methods.get_spec(method).family in ("cuma", "mixture")


def _method_options(method: str, conditioning: str = "fast") -> dict:
    from . import methods

    if method == "lora":
        return {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}
    options = {"r": 8, "lora_alpha": 16, "num_experts": 8, "top_k": 2, "router_hidden": 256}
    if conditioning == "fast":
        options.update(CUMA_FAST_OPTIONS)
    elif conditioning != "paper":
        raise ValueError(f"--conditioning must be 'fast' or 'paper', got {conditioning!r}")
    # an option the method does not have is one that does not apply to it (semantic-only CuMA reads no profile)
    accepted = methods.get_spec(method).options
    return {k: v for k, v in options.items() if k in accepted}


def _train(cfg: DemoConfig, method: str, prepared: Path, out: Path, options: Optional[dict] = None,
           callbacks: Optional[list] = None) -> dict:
    """One SFT run with the demo's budget; ``options`` override the method options (investigations), ``callbacks``
    go to the trainer."""
    from .config import load_config
    from .models import resolve_dtype_name
    from .train.config import SFTRunConfig
    from .train.sft import run_sft

    run_cfg = load_config(SFTRunConfig, None, [
        "--model.name_or_path", "smollm2-135m", "--model.dtype", resolve_dtype_name(cfg.dtype, _device()),
        "--data.path", str(prepared), "--method.name", method,
        "--train.output_dir", str(out), "--train.seed", str(cfg.seed), "--train.max_steps", str(cfg.steps),
        "--train.per_device_train_batch_size", str(cfg.batch_size),
        "--train.learning_rate", str(cfg.method_learning_rates.get(method, cfg.learning_rate)),
        "--train.lr_scheduler_type", cfg.lr_scheduler, "--train.logging_steps", str(max(1, cfg.steps // 6)),
        "--train.save_strategy", "no", "--train.report_to", "none",
        "--train.split_by_length", str(cfg.split_by_length),
    ])  # fmt: skip
    # the router lr split only where there are routers (LoRA's record then says plainly that it had none)
    run_cfg.train.router_learning_rate = cfg.router_learning_rate if has_routers(method) else None
    run_cfg.train.loraplus_lr_ratio = cfg.loraplus_lr_ratio
    run_cfg.model.attn_implementation = cfg.attn_implementation
    run_cfg.method.options = {**_method_options(method, cfg.conditioning), **(options or {})}
    return run_sft(run_cfg, callbacks=callbacks)


# ---------------------------------------------------------------------------------------------------- evaluation
def _evaluate(cfg, method: str, adapter: Optional[Path], base, tokenizer, data, out: Path, split: str = "test",
              routing=None) -> dict:
    """Score ``split`` with the method (untrained for ``adapter`` None). ``routing``: a
    :class:`~cuma.evaluate.topology.RoutingAccumulator` over the split's records that pools the gates of this pass."""
    from contextlib import nullcontext

    from . import methods
    from .evaluate.choice import compute_metrics
    from .evaluate.report import write_predictions_tsv
    from .evaluate.scoring import score_records
    from .routing import record_gates

    built = methods.build(method, base) if adapter is None else methods.load(None, base, adapter)
    model = built.model.to(_device()).eval()
    records = data.split(split)
    with record_gates(model) if routing is not None else nullcontext() as rec:
        preds = score_records(
            model, tokenizer, records, batch_size=cfg.eval_batch_size,
            profile_table=data.profile_embeds if built.uses_profile else None,
            profile_in_prompt=built.profile_in_prompt, progress=True, desc=f"eval {method}",
            on_rows=None if routing is None else (lambda idx: routing.add_forward(rec, [records[i] for i in idx])),
        )  # fmt: skip
    seen = [p for p in preds if not p["held_out"]]
    held = [p for p in preds if p["held_out"]]
    m_seen = compute_metrics(seen, per_question=False)
    table = {
        "accuracy": m_seen["accuracy"],
        "macro_f1": m_seen["macro_f1"],
        "emd": m_seen["emd"]["mean"],
        "emd_expected": m_seen["emd_expected"]["mean"],
        "entropy": m_seen["entropy"],
        "zero_shot_accuracy": compute_metrics(held, per_question=False)["accuracy"] if held else None,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_predictions_tsv(out / "predictions.tsv", preds)
    atomic_write_text(out / "metrics_seen.json", json.dumps(m_seen, indent=2))
    return {"table": table, "predictions": preds}


def routing_map(stats, held: list[str]) -> dict:
    """The report's routing map from pooled gates (:class:`~cuma.evaluate.topology.RoutingStats`): every country's
    expert load in the projection whose load differs most between countries (the clearest view of a single
    router), the load averaged over projections, and the countries' routing similarity over all projections."""
    per_layer = per_layer_load(stats)
    countries, similarity = routing_similarity(per_layer)
    spread = {name: float(stats.mean_gate[l].std(0).mean()) for l, name in enumerate(stats.layers)}
    clearest = max(spread, key=spread.get)
    return {"countries": countries, "held_out": list(held), "similarity": similarity, "layer": clearest,
            "load": {c: per_layer[c][clearest] for c in countries},
            "mean_load": {c: stats.mean_gate[:, k].mean(0).tolist() for k, c in enumerate(stats.groups)}}


def _device() -> torch.device:
    # the trainer picks a GPU by itself; evaluation follows it so `cuma demo --steps 300` runs in minutes on one
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def expert_load_by_country(model, tokenizer, records, profile_embeds, profile_in_prompt: bool, per_country: int = 16,
                           per_layer: bool = False) -> dict:
    """Mean gate per expert (over non-pad tokens) for up to ``per_country`` prompts of each country: averaged over
    every routed projection (``{country: [N]}``), or one vector per projection (``per_layer``: ``{country: {layer:
    [N]}}``; expert i of one layer has nothing to do with expert i of another). ``profile_embeds`` None for routers
    that see only tokens (semantic-only)."""
    from .evaluate.topology import collect_routing

    stats = collect_routing(model, tokenizer, records, group_field="country", profile_table=profile_embeds,
                            profile_in_prompt=profile_in_prompt, limit=per_country)
    if per_layer:
        return per_layer_load(stats)
    return {c: stats.mean_gate[:, k].mean(0).tolist() for k, c in enumerate(stats.groups)}


def per_layer_load(stats) -> dict:
    """``{group: {projection: [N]}}``: each group's mean gate per expert in every routed projection."""
    return {c: {name: stats.mean_gate[l, k].tolist() for l, name in enumerate(stats.layers)}
            for k, c in enumerate(stats.groups)}


def routing_similarity(per_layer_load: dict) -> tuple[list[str], list[list[float]]]:
    """Cosine similarity between countries of their routing (every layer's expert load, centred over countries and
    concatenated): near 1 for countries routed alike."""
    countries = sorted(per_layer_load)
    layers = sorted(next(iter(per_layer_load.values())))
    mat = torch.tensor([[x for name in layers for x in per_layer_load[c][name]] for c in countries])
    mat = torch.nn.functional.normalize(mat - mat.mean(0, keepdim=True), dim=-1)
    return countries, (mat @ mat.T).tolist()


# -------------------------------------------------------------------------------------------------------- claims
def demo_claims(results: dict, seed: int = 0) -> list[dict]:
    """The paper's claims as the demo checks them, from the methods' test predictions (the same pairs, in the same
    order, for every method): accuracy differences carry a paired bootstrap 95% interval over the pairs."""
    from .evaluate.paired import paired_accuracy_difference

    if not {"lora", "cuma"} <= set(results):
        return []
    ids = [p["id"] for p in results["cuma"]["predictions"]]
    for method, r in results.items():
        if [p["id"] for p in r["predictions"]] != ids:
            raise ValueError(f"claims: {method}'s test predictions are not the same pairs as CuMA's")

    def correct(method: str, held_out: bool) -> list[bool]:
        return [p["pred_index"] == p["gold_index"] for p in results[method]["predictions"]
                if bool(p["held_out"]) == held_out]

    def diff_claim(text: str, a: str, b: str, held_out: bool, target: float) -> Optional[dict]:
        ca, cb = correct(a, held_out), correct(b, held_out)
        if not ca:
            return None
        d = paired_accuracy_difference(ca, cb, seed=seed)
        return {"claim": text, "measured": d["difference"], "target": target, "met": d["difference"] >= target,
                "kind": "accuracy difference", "interval": [d["ci_low"], d["ci_high"]], "pairs": d["pairs"]}

    cuma, lora = results["cuma"]["table"], results["lora"]["table"]
    claims = [
        diff_claim("CuMA's accuracy >= LoRA's + 10 points (seen countries)", "cuma", "lora", False, 0.10),
        {"claim": "CuMA's EMD <= 0.7x LoRA's (seen countries)", "measured": cuma["emd"] / max(lora["emd"], 1e-12),
         "target": 0.7, "met": cuma["emd"] <= 0.7 * lora["emd"], "kind": "EMD ratio"},
    ]
    if "cuma-semantic" in results:
        claims.append(diff_claim("CuMA's accuracy above semantic-only CuMA's (seen countries)", "cuma", "cuma-semantic",
                                 False, 1e-9))
    claims += [
        diff_claim("CuMA's zero-shot accuracy >= LoRA's + 10 points (held-out countries)", "cuma", "lora", True, 0.10),
        {"claim": "CuMA's entropy below LoRA's (mean collapse mitigated)", "measured": cuma["entropy"] - lora["entropy"],
         "target": 0.0, "met": cuma["entropy"] < lora["entropy"], "kind": "entropy difference"},
    ]
    return [c for c in claims if c is not None]


def _claim_row(c: dict) -> str:
    if c["kind"] == "accuracy difference":
        measured = f"{100 * c['measured']:+.1f} points"
        interval = f"{100 * c['interval'][0]:+.1f} to {100 * c['interval'][1]:+.1f} ({c['pairs']} pairs)"
        target = f">= {100 * c['target']:+.0f}" if c["target"] >= 0.01 else "> 0"
    elif c["kind"] == "EMD ratio":
        measured, interval, target = f"{c['measured']:.2f}x", "-", f"<= {c['target']:.1f}x"
    else:
        measured, interval, target = f"{c['measured']:+.3f}", "-", "< 0"
    return f"| {c['claim']} | {measured} | {interval} | {target} | {'**met**' if c['met'] else '**not met**'} |"


# -------------------------------------------------------------------------------------------------------- report
def _fmt(value, pct=False, digits=3):
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if pct else f"{value:.{digits}f}"


def _write_report(cfg: DemoConfig, out: Path, summary: dict, results: dict, truth: dict, routing) -> None:
    out.mkdir(parents=True, exist_ok=True)
    figures = _figures(out, summary, results, truth, routing)
    o_seen, o_held = summary["oracle"]["seen"], summary["oracle"]["held_out"]
    n = summary["test_pairs"]
    held = ", ".join(f"{c} ({summary['zones'].get(c)})" for c in summary["held_out_countries"])
    cuma_desc = ("CuMA with fast conditioning (balanced router inputs, profile-led initial routing, profile input "
                 "centred on the training profiles' mean; "
                 "`--conditioning paper` for the paper's router)" if cfg.conditioning == "fast"
                 else "CuMA with the paper's router (raw concat of hidden state and profile embedding)")
    lines = [
        "# cuma demo: LoRA vs semantic-only CuMA vs CuMA on a synthetic population",
        "",
        f"SmolLM2-135M-Instruct, MiniLM profile embeddings, {cfg.participants} synthetic participants in "
        f"{cfg.countries} real countries of {len(cfg.zones)} Inglehart-Welzel cultural zones, {cfg.questions} "
        f"questions, {cfg.modes} latent cultural modes (one per zone); {cfg.train_pairs} training pairs; each method "
        f"trained for {cfg.steps} steps of batch {cfg.batch_size}{_split_text(cfg)} at learning rate {_lr_text(cfg)} "
        f"({cfg.lr_scheduler} schedule{_router_lr_text(cfg)}) "
        f"(seed {cfg.seed}), the frozen base in {cfg.dtype} (adapters in float32); {cuma_desc}. Test pairs come "
        f"from participants never seen in training: {n['seen']} from "
        f"the countries seen in training, {n['held_out']} from countries held out of training entirely (zero-shot "
        f"column): {held}." + (" **Quick smoke run: numbers are noise.**" if cfg.quick else ""),
        "",
        "| method | Acc % | Macro-F1 | EMD | EMD (expected) | entropy | zero-shot Acc % | trainable | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, row in summary["results"].items():
        train = summary["training"].get(method, {})
        trainable = f"{row['trainable_parameters']:,} ({100 * row['trainable_share']:.1f}%)" if row["trainable_parameters"] else "0"
        lines.append(
            f"| {METHOD_LABELS.get(method, method)} | {_fmt(row['accuracy'], True)} | {_fmt(row['macro_f1'])} | "
            f"{_fmt(row['emd'])} | {_fmt(row['emd_expected'])} | {_fmt(row['entropy'])} | "
            f"{_fmt(row['zero_shot_accuracy'], True)} | {trainable} | {_fmt(train.get('train_seconds'), digits=0)} |"
        )
    lines.append(
        f"| *oracle (true distributions)* | {_fmt(o_seen['accuracy'], True)} | - | {_fmt(o_seen['emd_mean'])} | "
        f"{_fmt(o_seen['emd_expected_mean'])} | - | {_fmt(o_held['accuracy'] if o_held else None, True)} | - | - |"
    )
    lines.append(
        f"| *population average (mean collapse)* | {_fmt(o_seen['population_accuracy'], True)} | - | "
        f"{_fmt(o_seen['population_emd_mean'])} | - | - | "
        f"{_fmt(o_held['population_accuracy'] if o_held else None, True)} | - | - |"
    )
    if summary.get("claims"):
        lines += [
            "",
            "The paper's claims on this run (accuracy differences with a paired bootstrap 95% interval over the test "
            "pairs: how far sampling alone moves them):",
            "",
            "| claim | measured | 95% interval | target | |",
            "|---|---:|---:|---:|---|",
            *[_claim_row(c) for c in summary["claims"]],
        ]
    lines += [
        "",
        "Acc, Macro-F1, EMD and entropy are over the seen-country test pairs; zero-shot Acc over the held-out "
        "countries' pairs. Acc: argmax matches the participant's answer. EMD: per-question 1-D Wasserstein distance "
        "between the normalised answers of the test participants and the model's argmax answers (expected: its full "
        "option distribution), averaged over questions; lower is better. Entropy: mean normalised entropy of the "
        "option distribution (high = hedging towards the average). The oracle predicts from each profile's true "
        "answer distribution; the population average is what a mean-collapsed model does at best.",
        "",
        *[f"![{name}]({name})" for name in figures],
        "",
        f"Command: `{_command(cfg)}` ({summary['wall_seconds'] / 60:.1f} minutes from start to report). Everything (predictions, adapters, run records) is under "
        f"`{cfg.work}/`; every number of this page is in `results.json`.",
    ]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2, default=str))


def _lr_text(cfg: DemoConfig) -> str:
    lrs = {m: cfg.method_learning_rates.get(m, cfg.learning_rate) for m in cfg.methods}
    if len(set(lrs.values())) == 1:
        return f"{cfg.learning_rate:g}"
    return ", ".join(f"{lr:g} ({METHOD_LABELS.get(m, m)})" for m, lr in lrs.items())


def _split_text(cfg: DemoConfig) -> str:
    if cfg.split_by_length <= 1:
        return ""
    return f" (each run as {cfg.split_by_length} micro-batches of similar length)"


def _router_lr_text(cfg: DemoConfig) -> str:
    if cfg.router_learning_rate is None or not any(has_routers(m) for m in cfg.methods):
        return ""
    return f"; CuMA's routers at {cfg.router_learning_rate:g}"


def _command(cfg: DemoConfig) -> str:
    """The `cuma demo` command line that reproduces ``cfg`` (flags only where they differ from the defaults)."""
    default = DemoConfig().quick_version() if cfg.quick else DemoConfig()
    parts = ["cuma demo"] + (["--quick"] if cfg.quick else [])
    for name in ("out", "work", "seed", "steps", "batch_size", "learning_rate", "lr_scheduler", "router_learning_rate",
                 "loraplus_lr_ratio", "conditioning", "split_by_length", "dtype",
                 "train_pairs", "test_pairs", "held_out_test_pairs"):
        value, default_value = getattr(cfg, name), getattr(default, name)
        if name == "dtype":  # "auto" resolves on this machine; name it only where the run's precision differs
            from .models import resolve_dtype_name

            value, default_value = resolve_dtype_name(value, _device()), resolve_dtype_name(default_value, _device())
        if value != default_value:
            parts.append(f"--{name.replace('_', '-')} {value}")
    if cfg.method_learning_rates != default.method_learning_rates:
        parts += [f"--method-learning-rate {m}={lr:g}" for m, lr in cfg.method_learning_rates.items()]
    return " ".join(parts)


def _figures(out: Path, summary: dict, results: dict, truth: dict, routing) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = []
    methods = list(summary["results"])
    labels = [METHOD_LABELS.get(m, m) for m in methods]

    # metric bars per method, oracle as a dashed line
    metrics = [("accuracy", "accuracy", "accuracy"), ("emd", "EMD (lower is better)", "emd_mean"),
               ("entropy", "normalised entropy", None), ("zero_shot_accuracy", "zero-shot accuracy", "held")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.6))
    for ax, (key, title, oracle_key) in zip(axes, metrics):
        values = [summary["results"][m][key] or 0.0 for m in methods]
        ax.bar(range(len(methods)), values, color=[METHOD_COLORS.get(m, "#8172b3") for m in methods])
        ax.set_xticks(range(len(methods)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        oracle = None
        if oracle_key == "held" and summary["oracle"]["held_out"]:
            oracle = summary["oracle"]["held_out"]["accuracy"]
        elif oracle_key:
            oracle = summary["oracle"]["seen"][oracle_key]
        if oracle is not None:
            ax.axhline(oracle, ls="--", color="black", lw=1, label="oracle")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=110)
    plt.close(fig)
    names.append("metrics.png")

    # predicted vs true answer distributions on conflicting questions, for two countries
    countries = sorted(truth["countries"])
    a, b = countries[0], countries[1]

    def true_dist(country, qid):
        rows = [p["distributions"][qid] for t, p in truth["profiles"].items() if f"Country: {country}." in t]
        return np.mean(rows, axis=0) if rows else None

    conflict = []
    for qid, q in truth["questions"].items():
        da, db = true_dist(a, qid), true_dist(b, qid)
        if da is not None and db is not None and not q.get("agree"):
            conflict.append((float(np.abs(da - db).sum()), qid))
    chosen = [q for _, q in sorted(conflict, reverse=True)[:3]]
    if chosen:
        fig, axes = plt.subplots(2, len(chosen), figsize=(4.2 * len(chosen), 6), squeeze=False)
        for col, qid in enumerate(chosen):
            for row, country in enumerate((a, b)):
                ax = axes[row][col]
                k = len(truth["questions"][qid]["option_values"])
                x = np.arange(k)
                width = 0.8 / (len(methods) + 1)
                ax.bar(x - 0.4 + width / 2, true_dist(country, qid), width, color="black", label="true")
                for i, m in enumerate(methods):
                    probs = [p["probs"] for p in results[m]["predictions"]
                             if p["question_id"] == qid and p["profile"].get("country") == country]
                    if probs:
                        ax.bar(x - 0.4 + width * (i + 1.5), np.mean(probs, axis=0), width,
                               label=METHOD_LABELS.get(m, m), color=METHOD_COLORS.get(m, "#8172b3"))
                ax.set_title(f"{qid}, {country}", fontsize=9)
                ax.set_xticks(x, [str(v) for v in truth["questions"][qid]["option_values"]], fontsize=8)
        axes[0][0].legend(fontsize=7)
        fig.suptitle("mean predicted vs true answer distribution (test participants)", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / "distributions.png", dpi=110)
        plt.close(fig)
        names.append("distributions.png")

    curves = summary.get("learning_curves") or {}
    if any(curves.get(m) for m in methods if m != "persona"):
        start = (curves.get("persona") or [None])[0]
        nv = summary.get("valid_pairs") or {"seen": 1, "held_out": 0}

        def pooled(row):  # accuracy over every valid pair, seen and held-out countries together
            if row.get("zero_shot_accuracy") is None or not nv["held_out"]:
                return row["accuracy"]
            return (nv["seen"] * row["accuracy"] + nv["held_out"] * row["zero_shot_accuracy"]) / (nv["seen"] + nv["held_out"])

        o_seen, o_held = summary["oracle"]["seen"], summary["oracle"]["held_out"] or {}
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        for ax, value, title, oracle in (
            (axes[0], pooled, f"valid accuracy ({nv['seen'] + nv['held_out']} pairs, seen + held-out countries)",
             o_seen["accuracy"]),
            (axes[1], lambda r: r["emd"], f"valid EMD, seen countries ({nv['seen']} pairs; lower is better)",
             o_seen["emd_mean"]),
        ):
            for m in methods:
                rows = [r for r in curves.get(m, []) if "accuracy" in r]
                if m == "persona" or not rows:
                    continue
                pts = ([(0, value(start))] if start else []) + [(r["step"], value(r)) for r in rows]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=METHOD_LABELS.get(m, m),
                        color=METHOD_COLORS.get(m, "#8172b3"))
            if oracle is not None:
                ax.axhline(oracle, ls="--", color="black", lw=1, label="oracle (test)")
            ax.set_xlabel("training step (step 0: the untrained model)")
            ax.set_title(title, fontsize=9)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "learning_curve.png", dpi=110)
        plt.close(fig)
        names.append("learning_curve.png")

    if routing:
        zones = summary.get("zones", {})
        held = set(summary.get("held_out_countries", []))
        order = sorted(routing["countries"], key=lambda c: (list(dict.fromkeys(zones.values())).index(zones.get(c))
                                                           if zones.get(c) in zones.values() else 0, c in held, c))
        pos = {c: i for i, c in enumerate(routing["countries"])}
        labels = [f"{c} ({zones.get(c) or '-'})" + (" *" if c in held else "") for c in order]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.3 * len(order) + 2.2),
                                       gridspec_kw={"width_ratios": [1, 1.6]})
        load = np.array([routing["load"][c] for c in order])
        im = ax1.imshow(load, aspect="auto", cmap="viridis")
        ax1.set_yticks(range(len(order)), labels, fontsize=7)
        ax1.set_xticks(range(load.shape[1]), [f"E{i}" for i in range(load.shape[1])], fontsize=7)
        ax1.set_title(f"expert load per country\n{routing['layer'].split('model.layers.')[-1]}", fontsize=9)
        fig.colorbar(im, ax=ax1, fraction=0.05)
        sim = np.array([[routing["similarity"][pos[a]][pos[b]] for b in order] for a in order])
        im2 = ax2.imshow(sim, cmap="RdBu_r", vmin=-1, vmax=1)
        ax2.set_yticks(range(len(order)), labels, fontsize=7)
        ax2.set_xticks(range(len(order)), [c for c in order], rotation=90, fontsize=7)
        ax2.set_title("routing similarity between countries (all layers)", fontsize=9)
        fig.colorbar(im2, ax=ax2, fraction=0.04)
        fig.suptitle("CuMA routing map (* = held out of training)", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / "expert_load.png", dpi=110)
        plt.close(fig)
        names.append("expert_load.png")
    return names
