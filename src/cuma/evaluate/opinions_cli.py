"""``cuma eval opinions``: a model's option distribution on every opinion cell of a prepared opinions folder against
the cell's target, beside the reference rows (``cuma.evaluate.opinions``).

    cuma eval opinions --model M --method NAME [--adapter DIR] --data DIR --out DIR [--split test] [--limit N]
                       [--k-nearest 5] [--compare OTHER_RUN_DIR] [--overwrite]

The prompt and the letter scoring are ``cuma eval wvb``'s (:func:`cuma.data.opinions.cell_to_record` renders a cell
as a WVB record; :func:`cuma.evaluate.scoring.score_prompts` softmaxes the option-letter logits at the answer
position). Writes ``summary.json`` (overall / seen / held-out blocks with ``references``, per group, per source,
paired bootstrap intervals), ``cells.tsv`` (every cell: target, prediction, metrics, the references' metrics) and
``report.md`` with its PNG figures.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .opinions import METRICS, REFERENCES, cell_metrics, reference_predictions, summarise

__all__ = ["add_parser", "build_method", "evaluate_opinions", "paired_difference", "read_cells_tsv", "run_opinions",
           "write_outputs"]

PAIRED_METRICS = ("js_distance", "total_variation")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "opinions",
        help="group-level answer distributions (cuma data opinions): JS distance, TV, W1, argmax vs references",
        description="Score every cell of a prepared opinions folder by the option-letter logits at the answer position "
        "and compare the option distribution with the cell's target; write summary.json, cells.tsv and report.md.",
    )
    p.add_argument("--model", default="smollm2-135m", help="base model: hub id, local folder or 'smollm2-135m'")
    p.add_argument("--method", default=None, help="method name; default: read from --adapter's cuma_method.json. "
                   "'persona' (no adapter) is the untrained model with the group's profile in its prompt")
    p.add_argument("--adapter", default=None, help="folder of the trained adapter / model (trained methods only)")
    p.add_argument("--data", required=True, help="prepared opinions folder (cuma data opinions)")
    p.add_argument("--out", required=True, help="output folder for summary.json, cells.tsv and report.md")
    p.add_argument("--split", default="test", help="which cells_{split}.jsonl to score (default: test)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N cells of the split")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward (default 16)")
    p.add_argument("--k-nearest", type=int, default=5, help="training groups averaged by the nearest_groups reference")
    p.add_argument("--profile-in-prompt", action=argparse.BooleanOptionalAction, default=None,
                   help="put the group's profile sentence in the system prompt (default: what the method was trained "
                   "with)")
    p.add_argument("--compare", default=None, help="another `cuma eval opinions` output folder scored on the same "
                   "cells: paired bootstrap interval of the difference (this run - that run)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the paired intervals")
    p.add_argument("--seed", type=int, default=0, help="seed (bootstrap, torch); default 0")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--no-figures", action="store_true", help="write report.md without PNG figures")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="model dtype, e.g. bfloat16 (default: the checkpoint's)")
    p.set_defaults(_eval_run=run_opinions)


def build_method(name: Optional[str], adapter: Optional[str], base, profile_in_prompt: Optional[bool] = None):
    """(BuiltMethod, name) to score opinion cells: :func:`cuma.evaluate.wvb.build_method` without the few-shot
    baseline (a cell has a distribution, not answers to show)."""
    from .wvb import build_method as build

    return build(name, adapter, base, profile_in_prompt=profile_in_prompt, fewshot=False)


def evaluate_opinions(model, tokenizer, built, data, *, split: str = "test", limit: Optional[int] = None,
                      batch_size: int = 16, k_nearest: int = 5, profile_in_prompt: Optional[bool] = None,
                      progress: bool = True, desc: str = "eval opinions") -> dict[str, Any]:
    """Score ``split`` of ``data`` (:class:`cuma.data.opinions.OpinionData`) with ``model`` and the references.

    Returns ``{"cells": [...], "summary": {...}, "counts": {...}}``: one row per cell (ids, target, prediction,
    metrics and each reference's prediction and metrics) and :func:`cuma.evaluate.opinions.summarise` of them."""
    import torch

    from .scoring import build_prompts, letter_ids_for, score_prompts

    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    records = data.records(split)
    in_split = len(records)
    if limit is not None:
        records = records[:limit]
    if not records:
        raise ValueError(f"{data.path}: split {split!r} has no cells to score (cells_{split}.jsonl is empty)")
    pip = built.profile_in_prompt if profile_in_prompt is None else bool(profile_in_prompt)
    rows = None
    if built.uses_profile:
        if data.profile_embeds is None:
            raise FileNotFoundError(f"method {built.name!r} routes on the profile but {data.path} has no "
                                    "profile_embeds.safetensors")
        if data.profile_embeds.shape[1] != built.profile_dim:
            raise ValueError(f"{data.path}/profile_embeds.safetensors holds {data.profile_embeds.shape[1]}-d "
                             f"embeddings but the adapter was built with profile_dim={built.profile_dim}")
        rows = data.profile_embeds[torch.as_tensor([int(r["profile_index"]) for r in records])]
    dists = score_prompts(model, tokenizer, build_prompts(records, tokenizer, profile_in_prompt=pip),
                          letter_ids_for(tokenizer, records), batch_size=batch_size, profile_rows=rows,
                          progress=progress, desc=desc)
    train = data.records("train")
    refs = reference_predictions(records, train, k=k_nearest, profile_embeds=data.profile_embeds,
                                 group_index=data.group_index)
    cells = []
    for i, (rec, p) in enumerate(zip(records, dists)):
        row = {"cell_id": rec["cell_id"], "group_id": rec["group_id"], "question_id": rec["question_id"],
               "source": rec.get("source", ""), "held_out": bool(rec.get("held_out")), "ordinal": bool(rec["ordinal"]),
               "target": [float(x) for x in rec["target"]], "prediction": [float(x) for x in p]}
        row.update(cell_metrics(p, rec["target"], rec["ordinal"]))
        for name in REFERENCES:
            q = refs[name][i]
            row[name] = None if q is None else {"prediction": q, **cell_metrics(q, rec["target"], rec["ordinal"])}
        cells.append(row)
    summary = summarise(cells, {name: [c[name] for c in cells] for name in REFERENCES})
    counts = {"cells_in_split": in_split, "cells": len(cells), "beyond_limit": in_split - len(cells),
              "groups": len({c["group_id"] for c in cells}), "questions": len({c["question_id"] for c in cells}),
              "held_out_cells": sum(c["held_out"] for c in cells), "train_cells": len(train),
              "not_covered": {name: sum(c[name] is None for c in cells) for name in REFERENCES}}
    return {"cells": cells, "summary": summary, "counts": counts, "profile_in_prompt": pip}


def paired_difference(cells_a: Sequence[dict], cells_b: Sequence[dict], metric: str = "js_distance", *,
                      n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """``mean(a) - mean(b)`` of ``metric`` over the cells both scored (matched by ``cell_id``), with the paired
    percentile bootstrap interval of :func:`cuma.evaluate.paired.paired_accuracy_difference`; for seen and held-out
    cells separately and together."""
    from .paired import paired_accuracy_difference

    b = {c["cell_id"]: c for c in cells_b}
    shared = [(c, b[c["cell_id"]]) for c in cells_a if c["cell_id"] in b
              and c.get(metric) is not None and b[c["cell_id"]].get(metric) is not None]
    out: dict[str, Any] = {"metric": metric, "cells_a": len(cells_a), "cells_b": len(cells_b)}
    for part, keep in (("overall", lambda c: True), ("seen", lambda c: not c["held_out"]),
                       ("held_out", lambda c: c["held_out"])):
        pairs = [(x, y) for x, y in shared if keep(x)]
        out[part] = None if not pairs else paired_accuracy_difference(
            [float(x[metric]) for x, _ in pairs], [float(y[metric]) for _, y in pairs], n_boot=n_boot, seed=seed)
    return out


def reference_comparisons(cells: Sequence[dict], *, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The model against each reference on the cells that reference covers (js_distance, total_variation)."""
    out = {}
    for name in REFERENCES:
        ref = [{**c[name], "cell_id": c["cell_id"], "held_out": c["held_out"]} for c in cells if c[name] is not None]
        out[name] = {m: paired_difference(cells, ref, m, n_boot=n_boot, seed=seed) for m in PAIRED_METRICS}
    return out


# ------------------------------------------------------------------------------------------------- cells.tsv

TSV_COLUMNS = ("cell_id", "group_id", "question_id", "source", "held_out", "ordinal", "target", "prediction",
               *METRICS, *(f"{r}_{m}" for r in REFERENCES for m in ("prediction", *METRICS)))


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return json.dumps([round(float(x), 6) for x in value])
    return str(value)


def cells_tsv(cells: Sequence[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    w.writerow(TSV_COLUMNS)
    for c in cells:
        row = [c.get(k) for k in TSV_COLUMNS[: 8 + len(METRICS)]]
        for r in REFERENCES:
            ref = c.get(r) or {}
            row += [ref.get("prediction")] + [ref.get(m) for m in METRICS]
        w.writerow([_fmt(v) for v in row])
    return buf.getvalue()


def read_cells_tsv(path) -> list[dict]:
    """The model columns of a ``cells.tsv`` (for ``--compare``); a missing column is a ValueError naming it."""
    path = Path(path)
    if path.is_dir():
        path = path / "cells.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (--compare expects a `cuma eval opinions` output folder)")
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        missing = [k for k in ("cell_id", "held_out", *METRICS) if k not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}; expected a cells.tsv of `cuma eval opinions`")
        out = []
        for n, row in enumerate(reader, start=2):
            try:
                out.append({"cell_id": row["cell_id"], "held_out": row["held_out"] == "1",
                            **{m: float(row[m]) if row[m] != "" else None for m in METRICS}})
            except ValueError as err:
                raise ValueError(f"{path}:{n}: {err}") from None
    return out


# ------------------------------------------------------------------------------------------------- report


def _num(x, digits=3) -> str:
    return "-" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def metric_table(blocks: dict[str, dict], title_rows: Sequence[tuple[str, str]]) -> str:
    """A markdown table of mean metrics: ``title_rows`` = (label, key in blocks)."""
    lines = ["| row | cells | JS distance | similarity | total variation | W1 (ordinal) | argmax agreement |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for label, key in title_rows:
        b = blocks.get(key)
        if not b:
            continue
        lines.append(f"| {label} | {b['cells']} | {_num(b['js_distance'])} | {_num(b['similarity'])} | "
                     f"{_num(b['total_variation'])} | {_num(b['w1_ordinal'])} | {_num(b['argmax_agreement'])} |")
    return "\n".join(lines)


def block_rows(block: dict, model_label: str) -> tuple[dict, list[tuple[str, str]]]:
    rows = {"model": block, **{r: block["references"][r] for r in REFERENCES}}
    return rows, [(model_label, "model"), ("uniform", "uniform"), ("population average (training groups)",
                                                                   "population_average"),
                  ("nearest training groups", "nearest_groups")]


def figures(out: Path, result: dict, label: str) -> list[str]:
    """``per_group_similarity.png`` and ``sample_cells.png`` in ``out``; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = result["cells"]
    summary = result["summary"]
    names = []
    groups = summary["per_group"]
    order = sorted(groups, key=lambda g: (groups[g]["held_out"], groups[g]["similarity"]))
    y = np.arange(len(order))
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.18 * len(order) + 1)))
    model = [groups[g]["similarity"] for g in order]
    pop = [groups[g]["references"]["population_average"]["similarity"] for g in order]
    ax.scatter(model, y, color=["#c44e52" if groups[g]["held_out"] else "#4c72b0" for g in order], s=18,
               label=f"{label} (red: held-out group)", zorder=3)
    ax.scatter([np.nan if v is None else v for v in pop], y, marker="|", color="#333333", s=60,
               label="population average", zorder=2)
    ax.set_yticks(y)
    ax.set_yticklabels([g if len(g) < 40 else g[:37] + "..." for g in order], fontsize=6)
    ax.set_xlabel("similarity = 1 - JS distance (base 2), mean over the group's cells")
    ax.set_title("Per-group similarity to the target distributions")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "per_group_similarity.png", dpi=110)
    plt.close(fig)
    names.append("per_group_similarity.png")

    # sample cells: the seen and held-out cells at the model's median JS distance and its worst
    picks = []
    for held in (False, True):
        part = sorted((c for c in cells if c["held_out"] == held), key=lambda c: c["js_distance"])
        if part:
            picks += [part[len(part) // 2], part[-1]]
    if picks:
        fig, axes = plt.subplots(1, len(picks), figsize=(3.2 * len(picks), 3.0), squeeze=False)
        for ax, c in zip(axes[0], picks):
            k = len(c["target"])
            x = np.arange(k)
            bars = [("target", c["target"], "#333333"), (label, c["prediction"], "#4c72b0")]
            if c.get("population_average"):
                bars.append(("population avg", c["population_average"]["prediction"], "#bbbbbb"))
            w = 0.8 / len(bars)
            for j, (name, values, color) in enumerate(bars):
                ax.bar(x + (j - (len(bars) - 1) / 2) * w, values, w, label=name, color=color)
            ax.set_xticks(x)
            ax.set_xticklabels([chr(65 + i) for i in range(k)])
            ax.set_ylim(0, 1)
            kind = "held-out group" if c["held_out"] else "seen group"
            ax.set_title(f"{c['question_id']} / {c['group_id'][:22]}\n{kind}, JS {c['js_distance']:.2f}", fontsize=7)
        axes[0][0].legend(fontsize=6)
        axes[0][0].set_ylabel("probability")
        fig.tight_layout()
        fig.savefig(out / "sample_cells.png", dpi=110)
        plt.close(fig)
        names.append("sample_cells.png")
    return names


def report_md(result: dict, config: dict, figure_names: Sequence[str]) -> str:
    s = result["summary"]
    label = config["method"]
    parts = [f"# Opinion distributions: {label} on {config['data']} ({config['split']} split)", "",
             "Per cell, the model's option distribution (softmax over the option letters at the answer position) "
             "against the cell's target. JS distance with base-2 logarithms (similarity = 1 - JS); total variation "
             "= 0.5 L1; W1 on ordinal questions normalised by (options - 1); lower is better for all three. "
             "References use no LM: uniform, the mean of the training groups on the same question, and the k="
             f"{config['k_nearest']} nearest training groups (by answers on training questions; held-out groups by "
             "profile embedding).", ""]
    for key, title in (("seen", "Seen groups"), ("held_out", "Held-out groups (zero-shot)")):
        if s[key]["cells"]:
            blocks, rows = block_rows(s[key], label)
            parts += [f"## {title}", "", metric_table(blocks, rows), ""]
    cmp_ = result.get("comparisons") or {}
    if cmp_:
        parts += ["## Paired differences (this run - other; JS distance, 95% bootstrap interval over cells)", "",
                  "| against | seen | held-out |", "|---|---|---|"]
        for name, by_metric in cmp_.items():
            d = by_metric.get("js_distance") or {}
            cols = [("-" if not d.get(p) else f"{d[p]['difference']:+.3f} [{d[p]['ci_low']:+.3f}, "
                     f"{d[p]['ci_high']:+.3f}]") for p in ("seen", "held_out")]
            parts.append(f"| {name} | {cols[0]} | {cols[1]} |")
        parts.append("")
    if len(s["per_source"]) > 1:
        blocks = {name: b for name, b in s["per_source"].items()}
        parts += ["## Per source", "", metric_table(blocks, [(n, n) for n in blocks]), ""]
    for name in figure_names:
        parts += [f"![{name}]({name})", ""]
    c = result["counts"]
    parts += [f"Cells scored: {c['cells']} of {c['cells_in_split']} ({c['beyond_limit']} beyond --limit); "
              f"{c['held_out_cells']} of held-out groups; references not covering a cell: {c['not_covered']}.", ""]
    return "\n".join(parts)


def write_outputs(out, result: dict, config: dict, *, overwrite: bool = False, with_figures: bool = True) -> Path:
    """``summary.json``, ``cells.tsv``, ``report.md`` (+ figures) into ``out``, all or nothing."""
    from ..runinfo import atomic_directory, dumps

    with atomic_directory(out, overwrite=overwrite) as tmp:
        names = figures(tmp, result, config["method"]) if with_figures else []
        summary = {"task": "opinions", **result["summary"], "comparisons": result.get("comparisons"),
                   "counts": result["counts"], "config": config, **result.get("record", {})}
        (tmp / "summary.json").write_text(dumps(summary, indent=2), encoding="utf-8")
        (tmp / "cells.tsv").write_text(cells_tsv(result["cells"]), encoding="utf-8")
        (tmp / "report.md").write_text(report_md(result, config, names), encoding="utf-8")
    return Path(out)


def run_opinions(args: argparse.Namespace) -> int:
    import torch

    from .. import models
    from ..data.opinions import load_opinions
    from ..runinfo import environment_record, sha256_file

    t0 = time.perf_counter()
    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
    data = load_opinions(args.data)
    other = read_cells_tsv(args.compare) if args.compare else None
    torch.manual_seed(args.seed)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device in (None, "", "auto")
                          else args.device)
    try:
        base, tokenizer = models.load_base_and_tokenizer(args.model, dtype=args.dtype)
    except models.ModelLoadError as err:
        raise ValueError(str(err)) from err
    built, method = build_method(args.method, args.adapter, base, args.profile_in_prompt)
    model = built.model.to(device).eval()
    result = evaluate_opinions(model, tokenizer, built, data, split=args.split, limit=args.limit,
                               batch_size=args.batch_size, k_nearest=args.k_nearest,
                               profile_in_prompt=args.profile_in_prompt, progress=not args.no_progress,
                               desc=f"eval {method}")
    comparisons = reference_comparisons(result["cells"], n_boot=args.bootstrap, seed=args.seed)
    if other is not None:
        comparisons["compare_run"] = {m: paired_difference(result["cells"], other, m, n_boot=args.bootstrap,
                                                           seed=args.seed) for m in PAIRED_METRICS}
        comparisons["compare_run"]["path"] = os.path.abspath(args.compare)
    result["comparisons"] = comparisons
    config = {"model": args.model, "method": method, "adapter": os.path.abspath(args.adapter) if args.adapter else None,
              "data": os.path.abspath(args.data), "split": args.split, "limit": args.limit,
              "batch_size": args.batch_size, "k_nearest": args.k_nearest, "profile_in_prompt": result["profile_in_prompt"],
              "seed": args.seed, "device": str(device), "js_base": 2}
    result["record"] = {
        "data_files": {name: sha256_file(data.path / name) for name in ("manifest.json", f"cells_{args.split}.jsonl",
                                                                         "cells_train.jsonl")},
        "environment": environment_record(), "seconds": round(time.perf_counter() - t0, 2)}
    write_outputs(out, result, config, overwrite=args.overwrite, with_figures=not args.no_figures)
    s = result["summary"]
    for key in ("seen", "held_out"):
        if s[key]["cells"]:
            r = s[key]["references"]
            print(f"{key}: {s[key]['cells']} cells, JS {s[key]['js_distance']:.4f} (uniform "
                  f"{_num(r['uniform']['js_distance'], 4)}, population average {_num(r['population_average']['js_distance'], 4)}, "
                  f"nearest groups {_num(r['nearest_groups']['js_distance'], 4)})")
    print(f"wrote {out}/summary.json, cells.tsv, report.md")
    return 0
