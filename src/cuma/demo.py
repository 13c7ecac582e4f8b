"""`cuma demo`: the main job on the embedded offline defaults (SmolLM2-135M, MiniLM, the synthetic population).

The recipe reads top to bottom in :func:`run_demo`:

1. generate a synthetic population whose latent cultural modes conflict, and prepare pairs with one country held out
   of training (its test pairs measure zero-shot accuracy);
2. train LoRA, semantic-only CuMA and CuMA with the same step budget (conditional SFT, profile in the prompt);
3. evaluate them and the untrained model with the persona prompt on the same test pairs;
4. write ``report/``: ``report.md`` (the comparison table beside the population's oracle figures), PNG figures and
   ``results.json`` with every number and the run record.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
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


@dataclass
class DemoConfig:
    out: str = "report"
    work: str = "runs/demo"
    seed: int = 0
    quick: bool = False
    # synthetic population
    participants: int = 1500
    questions: int = 8
    modes: int = 3
    countries: int = 6
    # pairs
    train_pairs: int = 480
    test_pairs: int = 160
    # training: the same budget for every method
    methods: list[str] = field(default_factory=lambda: ["lora", "cuma-semantic", "cuma"])
    steps: int = 30
    batch_size: int = 8
    learning_rate: float = 5e-4
    router_learning_rate: Optional[float] = None  # routers start untrained while B = 0: they may need a larger lr
    eval_batch_size: int = 32

    def quick_version(self) -> "DemoConfig":
        small = dict(participants=300, questions=4, countries=4, train_pairs=24, test_pairs=16, steps=3, batch_size=4)
        return DemoConfig(**{**asdict(self), **small, "quick": True})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    parser.add_argument("--quick", action="store_true", help="smoke version (~2 minutes): tiny data, 3 steps")
    parser.add_argument("--out", default=d.out, help="report folder (default: report)")
    parser.add_argument("--work", default=d.work, help="folder for data, adapters and evaluations")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--steps", type=int, default=None, help=f"training steps per method (default {d.steps})")
    parser.add_argument("--learning-rate", type=float, default=None, help=f"default {d.learning_rate}")
    parser.add_argument("--router-learning-rate", type=float, default=None,
                        help="learning rate of the routers (default: the main one)")
    parser.add_argument("--train-pairs", type=int, default=None, help=f"default {d.train_pairs}")
    parser.add_argument("--test-pairs", type=int, default=None, help=f"default {d.test_pairs}")


def run(args: argparse.Namespace) -> int:
    cfg = DemoConfig(out=args.out, work=args.work, seed=args.seed)
    if args.quick:
        cfg = cfg.quick_version()
    for name in ("steps", "learning_rate", "router_learning_rate", "train_pairs", "test_pairs"):
        value = getattr(args, name)
        if value is not None:
            if value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
            setattr(cfg, name, value)
    run_demo(cfg)
    return 0


class _Progress:
    def __init__(self, total: int) -> None:
        self.total, self.step, self.t0 = total, 0, time.perf_counter()

    def __call__(self, text: str) -> None:
        self.step += 1
        print(f"[{self.step}/{self.total} {time.perf_counter() - self.t0:6.0f}s] {text}", flush=True)


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    from .data.records import load_prepared
    from .data.splits import prepare_wvb
    from .data.synthetic import SynthConfig, load_truth, oracle_metrics, write_synthetic
    from .data.wvb import load_wvb
    from .models import load_base_and_tokenizer

    work, out = Path(cfg.work), Path(cfg.out)
    progress = _Progress(total=4 + 2 * len(cfg.methods))
    torch.manual_seed(cfg.seed)

    # 1. data
    progress(f"synthetic population: {cfg.participants} participants, {cfg.questions} questions, {cfg.modes} modes")
    raw = work / "data" / "raw"
    write_synthetic(
        raw,
        SynthConfig(participants=cfg.participants, questions=cfg.questions, modes=cfg.modes,
                    countries=cfg.countries, seed=cfg.seed),
        overwrite=True,
    )
    truth = load_truth(raw / "truth.json")
    held_country = sorted(truth["countries"])[-1]
    prepared = work / "data" / "prepared"
    prepare_wvb(
        load_wvb(raw), prepared, train_pairs=cfg.train_pairs, test_pairs=cfg.test_pairs, seed=cfg.seed,
        holdout_countries=[held_country], holdout_test_keeps_seen=True, overwrite=True,
    )
    data = load_prepared(prepared)
    seen_test = [r for r in data.test if not r["held_out"]]
    held_test = [r for r in data.test if r["held_out"]]
    oracle = {"seen": oracle_metrics(seen_test, truth), "held_out": oracle_metrics(held_test, truth) if held_test else None}

    # 2. training, the same budget for every method
    runs: dict[str, dict] = {}
    for method in cfg.methods:
        progress(f"training {METHOD_LABELS.get(method, method)}: {cfg.steps} steps x batch {cfg.batch_size}")
        runs[method] = _train(cfg, method, prepared, work / "adapters" / method)

    # 3. evaluation on the same test pairs
    base, tokenizer = load_base_and_tokenizer("smollm2-135m")
    results: dict[str, dict] = {}
    progress("evaluating the untrained model with the persona prompt")
    results["persona"] = _evaluate(cfg, "persona", None, base, tokenizer, data, work / "eval" / "persona")
    for method in cfg.methods:
        progress(f"evaluating {METHOD_LABELS.get(method, method)}")
        base, _ = load_base_and_tokenizer("smollm2-135m")
        results[method] = _evaluate(cfg, method, work / "adapters" / method, base, tokenizer, data, work / "eval" / method)

    # 4. report
    progress(f"writing {out}/")
    routing = _cuma_expert_load(cfg, work, tokenizer, data) if "cuma" in cfg.methods else None
    for method, run_record in runs.items():  # counted when training (a reloaded adapter is frozen)
        results[method]["table"]["trainable_parameters"] = run_record["method"]["trainable_parameters"]
        results[method]["table"]["trainable_share"] = (
            run_record["method"]["trainable_parameters"] / run_record["method"]["base_parameters"]
        )
    results["persona"]["table"].update(trainable_parameters=0, trainable_share=0.0)
    summary = {
        "config": asdict(cfg),
        "held_out_country": held_country,
        "oracle": oracle,
        "results": {m: r["table"] for m, r in results.items()},
        "training": {m: {k: runs[m][k] for k in ("train_seconds", "train_loss", "global_step")} for m in runs},
        "environment": environment_record(),
    }
    _write_report(cfg, out, summary, results, truth, routing)
    progress("done")
    print(f"\n{(out / 'report.md').read_text()}")
    return summary


# ------------------------------------------------------------------------------------------------------ training
def _method_options(method: str) -> dict:
    if method == "lora":
        return {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}
    options = {"r": 8, "lora_alpha": 16, "num_experts": 8, "top_k": 2, "router_hidden": 256}
    return options


def _train(cfg: DemoConfig, method: str, prepared: Path, out: Path, options: Optional[dict] = None,
           callbacks: Optional[list] = None) -> dict:
    """One SFT run with the demo's budget; ``options`` override the method options (investigations), ``callbacks``
    go to the trainer."""
    from .config import load_config
    from .train.config import SFTRunConfig
    from .train.sft import run_sft

    run_cfg = load_config(SFTRunConfig, None, [
        "--model.name_or_path", "smollm2-135m", "--data.path", str(prepared), "--method.name", method,
        "--train.output_dir", str(out), "--train.seed", str(cfg.seed), "--train.max_steps", str(cfg.steps),
        "--train.per_device_train_batch_size", str(cfg.batch_size), "--train.learning_rate", str(cfg.learning_rate),
        "--train.lr_scheduler_type", "constant", "--train.logging_steps", str(max(1, cfg.steps // 6)),
        "--train.save_strategy", "no", "--train.report_to", "none",
    ])  # fmt: skip
    run_cfg.train.router_learning_rate = cfg.router_learning_rate
    run_cfg.method.options = {**_method_options(method), **(options or {})}
    return run_sft(run_cfg, callbacks=callbacks)


# ---------------------------------------------------------------------------------------------------- evaluation
def _evaluate(cfg, method: str, adapter: Optional[Path], base, tokenizer, data, out: Path, split: str = "test") -> dict:
    from . import methods
    from .evaluate.choice import compute_metrics
    from .evaluate.report import write_predictions_tsv
    from .evaluate.scoring import score_records

    built = methods.build(method, base) if adapter is None else methods.load(None, base, adapter)
    preds = score_records(
        built.model.to(_device()).eval(), tokenizer, data.split(split), batch_size=cfg.eval_batch_size,
        profile_table=data.profile_embeds if built.uses_profile else None,
        profile_in_prompt=built.profile_in_prompt, progress=True, desc=f"eval {method}",
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


def _cuma_expert_load(cfg, work: Path, tokenizer, data) -> dict:
    """Mean gate per expert (over every adapted projection and non-pad token) for each country's test prompts."""
    from . import methods
    from .models import load_base

    built = methods.load(None, load_base("smollm2-135m"), work / "adapters" / "cuma")
    model = built.model.to(_device()).eval()
    return expert_load_by_country(model, tokenizer, data.test, data.profile_embeds, built.profile_in_prompt)


def _device() -> torch.device:
    # the trainer picks a GPU by itself; evaluation follows it so `cuma demo --steps 300` runs in minutes on one
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def expert_load_by_country(model, tokenizer, records, profile_embeds, profile_in_prompt: bool, per_country: int = 16) -> dict:
    """Mean gate per expert (over every routed projection and non-pad token) for up to ``per_country`` prompts of
    each country. ``profile_embeds`` None for routers that see only tokens (semantic-only)."""
    from .data.prompts import render_prompt
    from .routing import record_gates

    device = next(model.parameters()).device
    by_country: dict[str, list[dict]] = {}
    for r in records:
        by_country.setdefault(r["profile"].get("country", "?"), []).append(r)
    load = {}
    for country, rows in sorted(by_country.items()):
        rows = rows[:per_country]
        texts = [render_prompt(r, tokenizer, profile_in_prompt=profile_in_prompt) for r in rows]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        extra = {}
        if profile_embeds is not None:
            extra["profile_embeds"] = profile_embeds[torch.as_tensor([r["profile_index"] for r in rows])].to(device)
        with torch.no_grad(), record_gates(model) as rec:
            model(**enc, **extra)
        total = None
        for name, gates in rec.gates.items():
            g, m = gates[0], rec.masks[name][0]
            share = g[m].mean(0) if m is not None else g.reshape(-1, g.shape[-1]).mean(0)
            total = share if total is None else total + share
        load[country] = (total / len(rec.gates)).tolist()
    return load


# -------------------------------------------------------------------------------------------------------- report
def _fmt(value, pct=False, digits=3):
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if pct else f"{value:.{digits}f}"


def _write_report(cfg: DemoConfig, out: Path, summary: dict, results: dict, truth: dict, routing) -> None:
    out.mkdir(parents=True, exist_ok=True)
    figures = _figures(out, summary, results, truth, routing)
    o_seen, o_held = summary["oracle"]["seen"], summary["oracle"]["held_out"]
    lines = [
        "# cuma demo: LoRA vs semantic-only CuMA vs CuMA on a synthetic population",
        "",
        f"SmolLM2-135M-Instruct, MiniLM profile embeddings, {cfg.participants} synthetic participants, "
        f"{cfg.questions} questions, {cfg.modes} latent cultural modes; {cfg.train_pairs} training pairs; each method "
        f"trained for {cfg.steps} steps of batch {cfg.batch_size} at learning rate {cfg.learning_rate} (seed {cfg.seed}). "
        f"Test pairs come from participants never seen in training; country **{summary['held_out_country']}** is held "
        "out of training entirely and gives the zero-shot column." + (" **Quick smoke run: numbers are noise.**" if cfg.quick else ""),
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
        f"{_fmt(o_seen['population_emd_mean'])} | - | - | - | - | - |"
    )
    lines += [
        "",
        "Acc: argmax matches the participant's answer. EMD: per-question 1-D Wasserstein distance between the "
        "normalised answers of the test participants and the model's argmax answers (expected: its full option "
        "distribution), averaged over questions; lower is better. Entropy: mean normalised entropy of the option "
        "distribution (high = hedging towards the average). The oracle predicts from each profile's true answer "
        "distribution; the population average is what a mean-collapsed model does at best.",
        "",
        *[f"![{name}]({name})" for name in figures],
        "",
        f"Command: `{_command(cfg)}`. Everything (predictions, adapters, run records) is under "
        f"`{cfg.work}/`; every number of this page is in `results.json`.",
    ]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2, default=str))


def _command(cfg: DemoConfig) -> str:
    """The `cuma demo` command line that reproduces ``cfg`` (flags only where they differ from the defaults)."""
    default = DemoConfig().quick_version() if cfg.quick else DemoConfig()
    parts = ["cuma demo"] + (["--quick"] if cfg.quick else [])
    for name in ("out", "work", "seed", "steps", "learning_rate", "router_learning_rate", "train_pairs", "test_pairs"):
        value = getattr(cfg, name)
        if value != getattr(default, name):
            parts.append(f"--{name.replace('_', '-')} {value}")
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

    if routing:
        groups = sorted(routing)
        matrix = np.array([routing[g] for g in groups])
        fig, ax = plt.subplots(figsize=(6, 0.45 * len(groups) + 1.5))
        im = ax.imshow(matrix, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(groups)), [g + (" (held out)" if g == summary["held_out_country"] else "") for g in groups])
        ax.set_xticks(range(matrix.shape[1]), [f"E{i}" for i in range(matrix.shape[1])])
        ax.set_xlabel("expert")
        ax.set_title("CuMA expert load per country (mean gate, all layers)", fontsize=10)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(out / "expert_load.png", dpi=110)
        plt.close(fig)
        names.append("expert_load.png")
    return names
