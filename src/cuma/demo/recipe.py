"""The demo's recipe, top to bottom in :func:`run_demo`:

1. generate a synthetic population of real countries from five Inglehart-Welzel cultural zones whose latent
   cultural modes conflict, and prepare pairs with one country of every zone held out of training (its test pairs
   measure zero-shot transfer to an unseen country of a known zone);
2. train LoRA, semantic-only CuMA and CuMA with the same budget (conditional SFT, profile in the prompt), scoring
   valid pairs during training for the learning curves;
3. evaluate them and the untrained model with the persona prompt on the same test pairs
   (:func:`cuma.evaluate.wvb.evaluate_wvb`), pooling CuMA's gates into its routing map;
4. check the paper's claims (:func:`cuma.evaluate.claims.paper_claims`) and write the report (:mod:`.report`).
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Optional

import torch

from ..runinfo import atomic_write_text, environment_record
from .config import METHOD_LABELS, DemoConfig, device, has_routers, method_options
from .report import write_report

__all__ = [
    "Progress",
    "curve_steps",
    "evaluate_method",
    "held_out_countries",
    "load_base",
    "prepare_data",
    "run_demo",
    "train_method",
    "training_config",
]


class Progress:
    """``[step/total seconds] text`` lines on stdout."""

    def __init__(self, total: int) -> None:
        self.total, self.step, self.t0 = total, 0, time.perf_counter()

    def __call__(self, text: str) -> None:
        self.step += 1
        print(f"[{self.step}/{self.total} {time.perf_counter() - self.t0:6.0f}s] {text}", flush=True)


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    from ..data.records import load_prepared
    from ..data.synthetic import oracle_metrics
    from ..evaluate.claims import paper_claims
    from ..evaluate.topology import RoutingAccumulator, routing_map
    from ..models import emulated_bf16_note, resolve_dtype_name

    # the resolved precision is what the report and results.json record
    cfg = replace(cfg, dtype=resolve_dtype_name(cfg.dtype, device(), option="--dtype"))
    note = emulated_bf16_note(cfg.dtype, device())
    if note:
        warnings.warn(f"--dtype: {note}", stacklevel=2)
    work, out = Path(cfg.work), Path(cfg.out)
    progress = Progress(total=4 + 2 * len(cfg.methods))
    torch.manual_seed(cfg.seed)

    # 1. data
    progress(f"synthetic population: {cfg.participants} participants in {cfg.countries} countries, "
             f"{cfg.questions} questions, {cfg.modes} modes")
    prepared, truth, held = prepare_data(cfg, work / "data")
    data = load_prepared(prepared)
    seen_test = [r for r in data.test if not r["held_out"]]
    held_test = [r for r in data.test if r["held_out"]]
    oracle = {"seen": oracle_metrics(seen_test, truth), "held_out": oracle_metrics(held_test, truth) if held_test else None}
    base, tokenizer = load_base(cfg)

    # 2. training, the same budget for every method; valid pairs scored along the way (learning curves)
    steps = curve_steps(cfg.steps, cfg.curve_points)
    runs: dict[str, dict] = {}
    curves: dict[str, list] = {}
    for method in cfg.methods:
        progress(f"training {METHOD_LABELS.get(method, method)}: {cfg.steps} steps x batch {cfg.batch_size}")
        curve = validation_curve(cfg, method, tokenizer, data, steps)
        runs[method] = train_method(cfg, method, prepared, work / "adapters" / method,
                                    callbacks=[curve] if curve else None)
        curves[method] = curve.rows if curve else []

    # 3. evaluation on the same test pairs (and the untrained model's point of the learning curves)
    results: dict[str, dict] = {}
    progress("evaluating the untrained model with the persona prompt")
    results["persona"] = evaluate_method(cfg, "persona", None, base, tokenizer, data, work / "eval" / "persona")
    if steps:
        curves["persona"] = [validation_curve(cfg, "persona", tokenizer, data, [0]).evaluate(base, 0)]
    routing = None
    for method in cfg.methods:
        progress(f"evaluating {METHOD_LABELS.get(method, method)}")
        base, _ = load_base(cfg)
        # CuMA's routing map is pooled from the gates of its test evaluation (no forward of its own)
        loads = RoutingAccumulator(data.test) if method == "cuma" else None
        results[method] = evaluate_method(cfg, method, work / "adapters" / method, base, tokenizer, data,
                                          work / "eval" / method, routing=loads)
        if loads is not None:
            routing = routing_map(loads.stats(), held)

    # 4. claims and report
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
        "claims": paper_claims(results, seed=cfg.seed),
        "training": {m: {k: runs[m][k] for k in ("train_seconds", "train_loss", "global_step")} for m in runs},
        "cuma_options": {m: runs[m]["method"]["options"] for m in runs if m.startswith("cuma")},
        "learning_curves": curves,
        "routing": routing,
        "environment": environment_record(),
        "wall_seconds": round(time.perf_counter() - progress.t0, 1),  # start to report (the report's writing aside)
    }
    write_report(cfg, out, summary, results, truth, routing)
    progress("done")
    print(f"\n{(out / 'report.md').read_text()}")
    return summary


# ---------------------------------------------------------------------------------------------------------- data
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
    (held-out countries out of training; valid and test stratified into seen and held-out countries).
    Returns ``(prepared folder, the population's truth, held-out countries)``."""
    from ..data.splits import prepare_wvb
    from ..data.synthetic import load_truth, write_synthetic
    from ..data.wvb import load_wvb

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


def load_base(cfg: DemoConfig):
    """The demo's frozen base and tokenizer, in the demo's precision and attention (``cfg.dtype`` resolved)."""
    from ..models import load_base_and_tokenizer, resolve_dtype_name

    extra = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    return load_base_and_tokenizer("smollm2-135m", dtype=resolve_dtype_name(cfg.dtype, device()), **extra)


# ------------------------------------------------------------------------------------------------------ training
def curve_steps(steps: int, points: int) -> list[int]:
    """``points`` evenly spaced steps ending at ``steps`` (the learning curve's evaluations)."""
    if points <= 0:
        return []
    return sorted({max(1, round(steps * (i + 1) / points)) for i in range(points)})


def validation_curve(cfg: DemoConfig, method: str, tokenizer, data, steps):
    """The trainer callback that scores the valid pairs at ``steps`` (None without steps or valid pairs)."""
    from .. import methods
    from ..train.callbacks import ValidationCurve

    if not steps or not data.valid:
        return None
    spec = methods.get_spec(method)
    table = data.profile_embeds if spec.profile_routing else None
    return ValidationCurve(steps, tokenizer, data.valid, profile_table=table, profile_in_prompt=True,
                           batch_size=cfg.eval_batch_size)


def training_config(cfg: DemoConfig, method: str, prepared: Path, out: Path, options: Optional[dict] = None):
    """The :class:`~cuma.train.config.SFTRunConfig` of one method's run with the demo's budget; ``options`` override
    the method options (:func:`~cuma.demo.config.method_options`)."""
    from ..models import resolve_dtype_name
    from ..train.config import DataSection, MethodSection, ModelSection, SFTRunConfig, TrainSection

    return SFTRunConfig(
        model=ModelSection(name_or_path="smollm2-135m", dtype=resolve_dtype_name(cfg.dtype, device()),
                           attn_implementation=cfg.attn_implementation),
        method=MethodSection(name=method, options={**method_options(method, cfg.conditioning), **(options or {})}),
        data=DataSection(path=str(prepared)),
        train=TrainSection(
            output_dir=str(out), seed=cfg.seed, max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate_of(method), lr_scheduler_type=cfg.lr_scheduler,
            logging_steps=max(1, cfg.steps // 6), save_strategy="no", report_to=["none"],
            split_by_length=cfg.split_by_length,
            # the router lr only where there are routers (LoRA's record then says plainly that it had none)
            router_learning_rate=cfg.router_learning_rate if has_routers(method) else None,
            loraplus_lr_ratio=cfg.loraplus_lr_ratio,
        ),
    )  # fmt: skip


def train_method(cfg: DemoConfig, method: str, prepared: Path, out: Path, options: Optional[dict] = None,
                 callbacks: Optional[list] = None) -> dict:
    """One SFT run with the demo's budget (:func:`training_config`); ``callbacks`` go to the trainer. Returns the
    run record of :func:`cuma.train.sft.run_sft`."""
    from ..train.sft import run_sft

    return run_sft(training_config(cfg, method, prepared, out, options), callbacks=callbacks)


# ---------------------------------------------------------------------------------------------------- evaluation
def evaluate_method(cfg: DemoConfig, method: str, adapter: Optional[Path], base, tokenizer, data, out: Path,
                    split: str = "test", routing=None) -> dict:
    """Score ``split`` with the method (built untrained for ``adapter`` None) through
    :func:`cuma.evaluate.wvb.evaluate_wvb`; write its predictions and seen-country metrics to ``out``. Returns the
    report's table row (``table``: seen-country metrics and zero-shot accuracy) and the ``predictions``.
    ``routing``: a :class:`~cuma.evaluate.topology.RoutingAccumulator` that pools the gates of this pass."""
    from .. import methods
    from ..evaluate.choice import compute_metrics
    from ..evaluate.report import write_predictions_tsv
    from ..evaluate.wvb import WVBEvalConfig, evaluate_wvb

    built = methods.build(method, base) if adapter is None else methods.load(None, base, adapter)
    built.model.to(device()).eval()
    result = evaluate_wvb(built, tokenizer, data, WVBEvalConfig(split=split, batch_size=cfg.eval_batch_size,
                                                                per_question=False), routing=routing)
    m_seen = compute_metrics(result.seen, per_question=False)
    held = result.held_out
    table = {
        "accuracy": m_seen["accuracy"],
        "macro_f1": m_seen["macro_f1"],
        "emd": m_seen["emd"]["mean"],
        "emd_expected": m_seen["emd_expected"]["mean"],
        "entropy": m_seen["entropy"],
        "zero_shot_accuracy": compute_metrics(held, per_question=False)["accuracy"] if held else None,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_predictions_tsv(out / "predictions.tsv", result.predictions)
    atomic_write_text(out / "metrics_seen.json", json.dumps(m_seen, indent=2))
    return {"table": table, "predictions": result.predictions}
