"""The demo's report: ``report.md`` (the comparison table beside the population's oracle, the claims table, the
figures) and ``results.json`` (every number), plus the `cuma demo` command line that reproduces a run."""

from __future__ import annotations

import json
from pathlib import Path

from ..runinfo import atomic_write_text
from .config import METHOD_LABELS, DemoConfig, device, has_routers
from .figures import write_figures

__all__ = ["claim_row", "command_line", "write_report"]


def claim_row(c: dict) -> str:
    """One row of the claims table (a claim of :func:`cuma.evaluate.claims.paper_claims`)."""
    if c["kind"] == "accuracy difference":
        measured = f"{100 * c['measured']:+.1f} points"
        interval = f"{100 * c['interval'][0]:+.1f} to {100 * c['interval'][1]:+.1f} ({c['pairs']} pairs)"
        target = f">= {100 * c['target']:+.0f}" if c["target"] >= 0.01 else "> 0"
    elif c["kind"] == "EMD ratio":
        measured, interval, target = f"{c['measured']:.2f}x", "-", f"<= {c['target']:.1f}x"
    else:
        measured, interval, target = f"{c['measured']:+.3f}", "-", "< 0"
    return f"| {c['claim']} | {measured} | {interval} | {target} | {'**met**' if c['met'] else '**not met**'} |"


def _fmt(value, pct=False, digits=3):
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if pct else f"{value:.{digits}f}"


def write_report(cfg: DemoConfig, out: Path, summary: dict, results: dict, truth: dict, routing) -> None:
    """Write ``out/report.md``, its figures and ``out/results.json`` (``summary``, as :func:`~cuma.demo.run_demo` built it)."""
    out.mkdir(parents=True, exist_ok=True)
    figures = write_figures(out, summary, results, truth, routing)
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
            *[claim_row(c) for c in summary["claims"]],
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
        f"Command: `{command_line(cfg)}` ({summary['wall_seconds'] / 60:.1f} minutes from start to report). Everything (predictions, adapters, run records) is under "
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


def command_line(cfg: DemoConfig) -> str:
    """The `cuma demo` command line that reproduces ``cfg`` (flags only where they differ from the defaults)."""
    default = DemoConfig().quick_version() if cfg.quick else DemoConfig()
    parts = ["cuma demo"] + (["--quick"] if cfg.quick else [])
    for name in ("out", "work", "seed", "steps", "batch_size", "learning_rate", "lr_scheduler", "router_learning_rate",
                 "loraplus_lr_ratio", "conditioning", "split_by_length", "dtype",
                 "train_pairs", "test_pairs", "held_out_test_pairs"):
        value, default_value = getattr(cfg, name), getattr(default, name)
        if name == "dtype":  # "auto" resolves on this machine; name it only where the run's precision differs
            from ..models import resolve_dtype_name

            value, default_value = resolve_dtype_name(value, device()), resolve_dtype_name(default_value, device())
        if value != default_value:
            parts.append(f"--{name.replace('_', '-')} {value}")
    if cfg.method_learning_rates != default.method_learning_rates:
        parts += [f"--method-learning-rate {m}={lr:g}" for m, lr in cfg.method_learning_rates.items()]
    return " ".join(parts)
