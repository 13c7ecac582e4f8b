"""``cuma bench opinions``: train LoRA, semantic-only CuMA and CuMA with the same budget and objective on a prepared
opinions folder, score them, the untrained model with the persona prompt and the reference rows on the same cells,
and write ``results.json`` (every row's metrics in the same keys) and ``report.md``.

    cuma bench opinions --data DIR --out DIR [--quick] [--steps N] [--methods lora,cuma-semantic,cuma]

The recipe reads top to bottom in :func:`run_bench_opinions`: opinions folder -> one ``run_sft`` per method
(``train.objective: distribution``; every method the same steps, batch and schedule) -> ``evaluate_opinions``
of each trained method and of the persona prompt on the evaluation split -> references -> paired bootstrap
differences -> results.json, report.md and figures.
"""

from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from .tuners.cuma.config import FAST_ROUTER_LR_RATIO

__all__ = ["BenchConfig", "add_arguments", "run", "run_bench_opinions"]

LABELS = {"persona": "untrained + persona prompt", "lora": "LoRA", "cuma-semantic": "semantic-only CuMA",
          "cuma": "CuMA", "uniform": "uniform", "population_average": "population average (training groups)",
          "nearest_groups": "nearest training groups"}
ROW_KEYS = ("cells", "js_distance", "similarity", "total_variation", "w1_ordinal", "argmax_agreement")


@dataclass
class BenchConfig:
    data: str = ""
    out: str = "runs/bench-opinions"
    work: Optional[str] = None  # adapters go to WORK/<method> (default OUT/runs)
    model: str = "smollm2-135m"
    methods: list = field(default_factory=lambda: ["lora", "cuma-semantic", "cuma"])
    # 120 (round 2 on the synthetic population's valid split: CuMA closer to the targets than at 40 steps, LoRA the
    # same); 3 methods x 120 steps + scoring ~22 minutes on a 5,000-cell file on 2 CPU cores (docs/opinions.md)
    steps: int = 120
    batch_size: int = 8
    learning_rate: float = 2e-3
    method_learning_rates: dict = field(default_factory=lambda: {"lora": 1e-3})  # the demo's per-method choice
    router_lr_multiplier: float = FAST_ROUTER_LR_RATIO  # the routers of routed methods learn at this multiple of their lr
    lr_scheduler: str = "linear"
    cell_weighting: str = "none"
    cdf_loss_weight: float = 0.0
    eval_split: str = "test"
    eval_limit: Optional[int] = None
    eval_batch_size: int = 16
    k_nearest: int = 5
    persona: bool = True  # also score the untrained model with the persona prompt
    max_length: int = 512
    seed: int = 0
    quick: bool = False
    bootstrap: int = 2000

    def quick_version(self) -> "BenchConfig":
        return BenchConfig(**{**asdict(self), "steps": min(self.steps, 5), "batch_size": 4,
                              "eval_limit": min(self.eval_limit or 32, 32), "bootstrap": 500, "quick": True})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_task", metavar="TASK")
    sub.required = True
    d = BenchConfig()
    p = sub.add_parser("opinions", help="LoRA vs semantic-only CuMA vs CuMA on a prepared opinions folder",
                       description="Train each method with the same budget and objective on a prepared opinions "
                       "folder (cuma data opinions), evaluate them with the reference rows on the same cells, and "
                       "write results.json and report.md to --out.")
    p.add_argument("--data", required=True, help="prepared opinions folder")
    p.add_argument("--out", required=True, help="output folder (results.json, report.md, figures, runs/)")
    p.add_argument("--quick", action="store_true", help="5 steps of batch 4 and 32 evaluation cells (a smoke run)")
    p.add_argument("--steps", type=int, default=None, help=f"training steps of every method (default {d.steps})")
    p.add_argument("--methods", default=",".join(d.methods), help="comma-separated trained methods")
    p.add_argument("--model", default=d.model, help="base model (default: the embedded SmolLM2-135M)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--learning-rate", type=float, default=d.learning_rate,
                   help=f"every method's lr except LoRA's {d.method_learning_rates['lora']:g} unless set here")
    p.add_argument("--cell-weighting", choices=("none", "weight"), default=d.cell_weighting)
    p.add_argument("--cdf-loss-weight", type=float, default=d.cdf_loss_weight)
    p.add_argument("--eval-split", default=d.eval_split, help="split scored (default test; valid to choose settings)")
    p.add_argument("--eval-limit", type=int, default=None, help="score only the first N cells of the split")
    p.add_argument("--no-persona", action="store_true", help="skip the untrained persona-prompt row")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(_bench_run=_run_opinions_args)


def run(args: argparse.Namespace) -> int:
    return int(args._bench_run(args) or 0)


def _run_opinions_args(args: argparse.Namespace) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    cfg = BenchConfig(data=args.data, out=args.out, model=args.model, methods=methods,
                      batch_size=args.batch_size, learning_rate=args.learning_rate, cell_weighting=args.cell_weighting,
                      cdf_loss_weight=args.cdf_loss_weight, eval_split=args.eval_split, eval_limit=args.eval_limit,
                      persona=not args.no_persona, seed=args.seed)
    if args.learning_rate != BenchConfig.learning_rate:
        cfg.method_learning_rates = {}
    if args.quick:
        cfg = cfg.quick_version()
    if args.steps is not None:
        cfg.steps = args.steps
    out = Path(cfg.out)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
    results = run_bench_opinions(cfg, overwrite=args.overwrite)
    for part in ("seen", "held_out"):
        rows = results["rows"]
        if rows and rows[next(iter(rows))][part]["cells"]:
            text = ", ".join(f"{name} {r[part]['js_distance']:.4f}" for name, r in rows.items()
                             if r[part]["js_distance"] is not None)
            print(f"{part} JS distance: {text}")
    print(f"wrote {out}/results.json and {out}/report.md")
    return 0


def train_config(cfg: BenchConfig, method: str, out: Path):
    """The ``SFTRunConfig`` of one method's run (the same budget for every method; the demo's per-method options,
    CuMA with the fast router preset)."""
    from .demo.config import has_routers, method_options
    from .train.config import DataSection, MethodSection, ModelSection, SFTRunConfig, TrainSection

    lr = cfg.method_learning_rates.get(method, cfg.learning_rate)
    return SFTRunConfig(
        model=ModelSection(name_or_path=cfg.model),
        method=MethodSection(name=method, options=method_options(method, "fast")),
        data=DataSection(path=str(cfg.data), max_length=cfg.max_length),
        train=TrainSection(output_dir=str(out), seed=cfg.seed, learning_rate=lr, max_steps=cfg.steps,
                           per_device_train_batch_size=cfg.batch_size, lr_scheduler_type=cfg.lr_scheduler,
                           router_learning_rate=lr * cfg.router_lr_multiplier if has_routers(method) else None,
                           logging_steps=max(1, cfg.steps // 10), save_strategy="no", report_to=["none"],
                           disable_tqdm=True, objective="distribution", cell_weighting=cfg.cell_weighting,
                           cdf_loss_weight=cfg.cdf_loss_weight),
    )


def run_bench_opinions(cfg: BenchConfig, overwrite: bool = False) -> dict[str, Any]:
    import torch

    from . import methods
    from .data.opinions import load_opinions
    from .evaluate.opinions_cli import build_method, evaluate_opinions, paired_difference, reference_comparisons
    from .models import load_base_and_tokenizer
    from .runinfo import atomic_directory, dumps, environment_record, sha256_file
    from .train.sft import run_sft

    t0 = time.perf_counter()
    if not cfg.methods:
        raise ValueError("--methods: name at least one trained method")
    for m in cfg.methods:
        if not methods.get_spec(m).trainable:
            raise ValueError(f"--methods: {m!r} is a prompting baseline (the persona row is always scored)")
    data = load_opinions(cfg.data)
    out = Path(cfg.out)
    # adapters: WORK/<method>, or a sibling staging folder moved into OUT/runs with the results
    work = Path(cfg.work) if cfg.work else out.parent / f".{out.name}.runs"
    # 1. train every method with the same budget
    runs = {}
    for m in cfg.methods:
        run = run_sft(train_config(cfg, m, work / m))
        runs[m] = {"train_seconds": run["train_seconds"], "train_loss": run["train_loss"],
                   "global_step": run["global_step"], "train_cells": run["train_records"],
                   "trainable_parameters": run["method"].get("trainable_parameters"),
                   "learning_rate": cfg.method_learning_rates.get(m, cfg.learning_rate)}
    # 2. score each trained method and the persona prompt on the same cells
    results: dict[str, dict] = {}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = (["persona"] if cfg.persona else []) + list(cfg.methods)
    for name in rows:
        base, tokenizer = load_base_and_tokenizer(cfg.model)
        built, _ = build_method(name, None if name == "persona" else str(work / name), base)
        t = time.perf_counter()
        results[name] = evaluate_opinions(built.model.to(device).eval(), tokenizer, built, data,
                                          split=cfg.eval_split, limit=cfg.eval_limit,
                                          batch_size=cfg.eval_batch_size, k_nearest=cfg.k_nearest, progress=False)
        results[name]["eval_seconds"] = round(time.perf_counter() - t, 2)
    first = results[rows[0]]
    table = {name: {part: {k: r["summary"][part][k] for k in ROW_KEYS} for part in ("overall", "seen", "held_out")}
             for name, r in results.items()}
    for ref in ("uniform", "population_average", "nearest_groups"):
        table[ref] = {part: {k: first["summary"][part]["references"][ref][k] for k in ROW_KEYS}
                      for part in ("overall", "seen", "held_out")}
    # 3. paired differences over the same cells (JS distance, TV): CuMA against each other row
    focus = "cuma" if "cuma" in results else cfg.methods[-1]
    comparisons = {f"{focus} - {other}": {m: paired_difference(results[focus]["cells"], results[other]["cells"], m,
                                                               n_boot=cfg.bootstrap, seed=cfg.seed)
                                          for m in ("js_distance", "total_variation")}
                   for other in results if other != focus}
    for ref, by_metric in reference_comparisons(results[focus]["cells"], n_boot=cfg.bootstrap, seed=cfg.seed).items():
        comparisons[f"{focus} - {ref}"] = by_metric
    summary = {
        "command": "cuma bench opinions",
        "config": asdict(cfg),
        "rows": table,
        "comparisons": comparisons,
        "training": runs,
        "evaluation": {name: {"seconds": r["eval_seconds"], **r["counts"]} for name, r in results.items()},
        "data": {"path": str(data.path), "manifest_sha256": sha256_file(data.path / "manifest.json"),
                 "split": data.manifest.get("split"), "cells": data.manifest.get("counts", {}).get("cells")},
        "environment": environment_record(),
        "total_seconds": None,
    }
    with atomic_directory(out, overwrite=overwrite) as tmp:
        names = _figures(tmp, table, results, focus)
        summary["total_seconds"] = round(time.perf_counter() - t0, 1)
        (tmp / "results.json").write_text(dumps(summary, indent=2), encoding="utf-8")
        (tmp / "report.md").write_text(_report(cfg, summary, names), encoding="utf-8")
        if not cfg.work:
            shutil.move(str(work), str(tmp / "runs"))
    return summary


def _num(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _table(summary: dict, part: str) -> str:
    lines = ["| row | cells | JS distance | similarity | total variation | W1 (ordinal) | argmax agreement |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in summary["rows"].items():
        b = r[part]
        if not b["cells"]:
            continue
        lines.append(f"| {LABELS.get(name, name)} | {b['cells']} | {_num(b['js_distance'])} | {_num(b['similarity'])} "
                     f"| {_num(b['total_variation'])} | {_num(b['w1_ordinal'])} | {_num(b['argmax_agreement'])} |")
    return "\n".join(lines)


def _report(cfg: BenchConfig, summary: dict, figures: list) -> str:
    objective = "distribution matching (cross-entropy of the option-letter softmax against each cell's target)"
    lrs = ", ".join(f"{LABELS.get(m, m)} {v['learning_rate']:g}" for m, v in summary["training"].items())
    parts = [
        f"# Opinion distributions: {', '.join(LABELS.get(m, m) for m in cfg.methods)}", "",
        f"Data: `{summary['data']['path']}` (cells per split {summary['data']['cells']}); scored on the "
        f"`{cfg.eval_split}` split{'' if cfg.eval_limit is None else f' (first {cfg.eval_limit} cells)'}. "
        f"Every method: {cfg.steps} steps of batch {cfg.batch_size}, {objective}, {cfg.lr_scheduler} schedule, "
        f"learning rates {lrs} (routers at {cfg.router_lr_multiplier:g}x), base `{cfg.model}`."
        + (" **Quick smoke run: the figures are not measurements.**" if cfg.quick else ""), "",
        "JS distance base 2 (similarity = 1 - JS), total variation 0.5 L1, W1 on ordinal questions normalised by "
        "(options - 1): lower is better. The reference rows use no LM.", ""]
    for part, title in (("seen", "Seen groups"), ("held_out", "Held-out groups (zero-shot)")):
        if any(r[part]["cells"] for r in summary["rows"].values()):
            parts += [f"## {title}", "", _table(summary, part), ""]
    parts += ["## Paired differences (JS distance; 95% bootstrap interval over the same cells; negative: the first "
              "row is closer to the targets)", "", "| difference | seen | held-out |", "|---|---|---|"]
    for name, by_metric in summary["comparisons"].items():
        d = by_metric["js_distance"]
        cols = [("-" if not d.get(p) else f"{d[p]['difference']:+.4f} [{d[p]['ci_low']:+.4f}, {d[p]['ci_high']:+.4f}]")
                for p in ("seen", "held_out")]
        parts.append(f"| {name} | {cols[0]} | {cols[1]} |")
    parts.append("")
    for f in figures:
        parts += [f"![{f}]({f})", ""]
    t = summary["training"]
    parts += ["Training seconds: " + ", ".join(f"{LABELS.get(m, m)} {v['train_seconds']:.0f}" for m, v in t.items())
              + f"; total {summary['total_seconds']:.0f} s.", ""]
    return "\n".join(parts)


def _figures(out: Path, table: dict, results: dict, focus: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    colors = {"persona": "#999999", "lora": "#4c72b0", "cuma-semantic": "#dd8452", "cuma": "#55a868",
              "uniform": "#dddddd", "population_average": "#333333", "nearest_groups": "#8172b2"}
    parts = [p for p in ("seen", "held_out") if any(r[p]["cells"] for r in table.values())]
    fig, axes = plt.subplots(1, len(parts), figsize=(4.6 * len(parts) + 1.6, 0.42 * len(table) + 1.2), squeeze=False)
    for ax, part in zip(axes[0], parts):
        names = [n for n in table if table[n][part]["js_distance"] is not None]
        vals = [table[n][part]["js_distance"] for n in names]
        y = np.arange(len(names))[::-1]
        ax.barh(y, vals, color=[colors.get(n, "#777777") for n in names])
        for yi, v in zip(y, vals):
            ax.text(v, yi, f" {v:.3f}", va="center", fontsize=7)
        ax.set_yticks(y)
        ax.set_yticklabels([LABELS.get(n, n) for n in names] if part == parts[0] else [], fontsize=8)
        ax.set_xlim(0, max(vals) * 1.18)
        ax.set_title("seen groups" if part == "seen" else "held-out groups (zero-shot)", fontsize=9)
        ax.set_xlabel("mean JS distance to the targets (lower is better)", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "js_by_row.png", dpi=110)
    plt.close(fig)
    files = ["js_by_row.png"]
    from .evaluate.opinions_cli import figures as cell_figures

    for f in cell_figures(out, results[focus], LABELS.get(focus, focus)):
        files.append(f)
    return files
