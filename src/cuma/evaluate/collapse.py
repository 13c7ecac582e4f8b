"""Mean-collapse diagnostics across methods, from the outputs of ``cuma eval wvb`` (``docs/analysis.md``).

A mean-collapsed model answers every profile alike and hedges: its option distributions have high entropy and do
not differ between profile groups. Per run folder (``predictions.tsv`` + ``summary.json``, optionally
``generations.jsonl``):

- **prediction entropy**: the distribution (not just the mean) of the per-pair normalised entropies;
- **cross-profile diversity**: per question, the mean pairwise JS divergence (base 2) between the profile groups'
  *mean predicted* distributions, next to the same quantity for the groups' *gold* answer distributions; the ratio
  predicted / gold (1 = the model separates groups as much as people do, 0 = it answers every group alike);
- **distinct-n** of generations (``generations.jsonl`` rows ``{"profile_text" | "group", "text"}``), pooled and per
  group; ``"no generations"`` when a run has none.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .topology import js_divergence, normalized_entropy

__all__ = [
    "RunOutputs",
    "analyze_runs",
    "cross_profile_diversity",
    "distinct_n",
    "entropy_summary",
    "generation_diversity",
    "load_run",
    "prediction_entropies",
    "write_collapse_report",
]

GENERATIONS_FILE = "generations.jsonl"


@dataclass
class RunOutputs:
    """One evaluation run folder read back."""

    path: Path
    label: str
    method: Optional[str]
    rows: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)
    generations: Optional[list[dict[str, Any]]] = None


def _method_of(summary: Mapping[str, Any]) -> Optional[str]:
    run = summary.get("run") or {}
    cfg = run.get("config") or {}
    if cfg.get("method"):
        return str(cfg["method"])
    meth = run.get("method") or {}
    return str(meth.get("name") or meth.get("method")) if (meth.get("name") or meth.get("method")) else None


def load_run(path, label: Optional[str] = None) -> RunOutputs:
    """Read ``predictions.tsv`` (required), ``summary.json`` and ``generations.jsonl`` (optional) of a run folder."""
    from ..data.records import read_jsonl
    from ..runinfo import read_json
    from .report import read_predictions_tsv

    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"run folder {str(root)!r} does not exist")
    preds = root / "predictions.tsv"
    rows = read_predictions_tsv(preds) if preds.is_file() else []
    summary: dict[str, Any] = {}
    if (root / "summary.json").is_file():
        summary = read_json(root / "summary.json", dict, what="the summary `cuma eval` writes")
    gens = None
    if (root / GENERATIONS_FILE).is_file():
        gens = read_jsonl(root / GENERATIONS_FILE)  # not UTF-8 / not JSON: ValueError naming file:line
    if not rows and gens is None:
        raise FileNotFoundError(f"{root} holds neither predictions.tsv nor {GENERATIONS_FILE} (write one with "
                                "`cuma eval wvb`)")  # fmt: skip
    method = _method_of(summary)
    return RunOutputs(path=root, label=label or method or root.name, method=method, rows=rows, summary=summary,
                      generations=gens)  # fmt: skip


# ------------------------------------------------------------------------------------------------- entropy


def _distribution(row: Mapping[str, Any]) -> tuple[list[str], np.ndarray]:
    """(letters, probabilities) of a predictions.tsv row (``distribution``) or a prediction dict of
    :func:`cuma.evaluate.scoring.score_records` (``letters`` + ``probs``)."""
    if "distribution" not in row and "probs" in row:
        return list(row["letters"]), np.asarray(row["probs"], dtype=float)
    dist = row["distribution"]
    if isinstance(dist, str):
        dist = json.loads(dist)
    letters = sorted(dist)
    return letters, np.asarray([float(dist[k]) for k in letters], dtype=float)


def prediction_entropies(rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Normalised entropy of each row's option distribution (the ``entropy`` column, recomputed when absent)."""
    out = []
    for r in rows:
        value = r.get("entropy")
        if value not in (None, ""):
            out.append(float(value))
        else:
            out.append(normalized_entropy(_distribution(r)[1]))
    return np.asarray(out, dtype=float)


def entropy_summary(values: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Mean, std, quantiles and a histogram on [0, 1] of per-pair normalised entropies."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return {"n": 0}
    hist, edges = np.histogram(np.clip(v, 0, 1), bins=bins, range=(0.0, 1.0))
    q = np.quantile(v, [0.1, 0.25, 0.5, 0.75, 0.9])
    return {
        "n": int(v.size),
        "mean": float(v.mean()),
        "std": float(v.std()),
        "min": float(v.min()),
        "max": float(v.max()),
        "quantiles": {"p10": float(q[0]), "p25": float(q[1]), "p50": float(q[2]), "p75": float(q[3]), "p90": float(q[4])},
        "share_above_0.9": float(np.mean(v > 0.9)),
        "histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in hist]},
    }


# ------------------------------------------------------------------------------------------------- diversity


def _row_group(row: Mapping[str, Any], group_field: str) -> Optional[str]:
    value = row.get(group_field)
    if value is None:
        value = (row.get("profile") or {}).get(group_field) if isinstance(row.get("profile"), Mapping) else None
    if value in (None, ""):
        return None
    return str(value)


def _mean_pairwise_js(vectors: list[np.ndarray]) -> Optional[float]:
    if len(vectors) < 2:
        return None
    vals = [js_divergence(vectors[i], vectors[j]) for i in range(len(vectors)) for j in range(i + 1, len(vectors))]
    return float(np.mean(vals))


def cross_profile_diversity(
    rows: Sequence[Mapping[str, Any]], group_field: str = "country", min_rows: int = 1
) -> dict[str, Any]:
    """Per question: mean pairwise JS between the groups' mean predicted distributions (``predicted``) and between
    their gold answer distributions (``gold``), over the groups with at least ``min_rows`` rows of the question;
    ``ratio`` = predicted / gold (None when gold is 0). Summary: means over questions and the ratio of the means."""
    per_q: dict[str, dict[str, list]] = {}
    for r in rows:
        g = _row_group(r, group_field)
        if g is None:
            continue
        letters, p = _distribution(r)
        entry = per_q.setdefault(str(r["question_id"]), {"letters": letters, "groups": {}})
        if entry["letters"] != letters:
            raise ValueError(f"question {r['question_id']}: rows disagree on the option letters")
        gold = np.zeros(len(letters))
        gl = r.get("gold_letter")
        if gl in letters:
            gold[letters.index(gl)] = 1.0
        acc = entry["groups"].setdefault(g, [np.zeros(len(letters)), np.zeros(len(letters)), 0])
        acc[0] += p
        acc[1] += gold
        acc[2] += 1
    questions: dict[str, dict[str, Any]] = {}
    for qid in sorted(per_q):
        groups = {g: a for g, a in per_q[qid]["groups"].items() if a[2] >= min_rows}
        pred = _mean_pairwise_js([a[0] / a[2] for a in groups.values()])
        gold_vecs = [a[1] / a[1].sum() for a in groups.values() if a[1].sum() > 0]
        gold = _mean_pairwise_js(gold_vecs)
        ratio = pred / gold if pred is not None and gold is not None and gold > 0 else None
        questions[qid] = {"groups": len(groups), "predicted": pred, "gold": gold, "ratio": ratio}
    preds = [v["predicted"] for v in questions.values() if v["predicted"] is not None and v["gold"] is not None]
    golds = [v["gold"] for v in questions.values() if v["predicted"] is not None and v["gold"] is not None]
    ratios = [v["ratio"] for v in questions.values() if v["ratio"] is not None]
    mp = float(np.mean(preds)) if preds else None
    mg = float(np.mean(golds)) if golds else None
    return {
        "group_field": group_field,
        "questions_scored": len(preds),
        "predicted_mean": mp,
        "gold_mean": mg,
        "ratio_of_means": (mp / mg) if mp is not None and mg else None,
        "ratio_median": float(np.median(ratios)) if ratios else None,
        "per_question": questions,
    }


# ------------------------------------------------------------------------------------------------- distinct-n


def _tokens(text: str) -> list[str]:
    return str(text).lower().split()


def distinct_n(texts: Sequence[str], n: int) -> Optional[float]:
    """Unique n-grams / total n-grams over all ``texts`` (lower-cased whitespace tokens); None when there are none."""
    total = 0
    seen: set[tuple[str, ...]] = set()
    for t in texts:
        toks = _tokens(t)
        grams = [tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else None


def generation_diversity(generations: Optional[Sequence[Mapping[str, Any]]], ns: Sequence[int] = (1, 2)) -> dict:
    """distinct-n pooled and per group (``group`` or else ``profile_text``) of a run's generations."""
    if not generations:
        return {"status": "no generations"}
    texts = [str(g.get("text", "")) for g in generations]
    by_group: dict[str, list[str]] = {}
    for g, t in zip(generations, texts):
        key = g.get("group") or g.get("profile_text") or "(none)"
        by_group.setdefault(str(key), []).append(t)
    per_group = {k: {f"distinct_{n}": distinct_n(v, n) for n in ns} for k, v in sorted(by_group.items())}
    out: dict[str, Any] = {"status": "ok", "generations": len(texts), "groups": len(by_group)}
    for n in ns:
        out[f"distinct_{n}"] = distinct_n(texts, n)
        vals = [v[f"distinct_{n}"] for v in per_group.values() if v[f"distinct_{n}"] is not None]
        out[f"distinct_{n}_group_mean"] = float(np.mean(vals)) if vals else None
    out["per_group"] = per_group
    return out


# ------------------------------------------------------------------------------------------------- report


def analyze_runs(runs: Sequence[RunOutputs], group_field: str = "country", min_rows: int = 1) -> dict[str, Any]:
    """The collapse diagnostics of every run, keyed by label."""
    out: dict[str, Any] = {"group_field": group_field, "runs": {}}
    for run in runs:
        ent = prediction_entropies(run.rows)
        metrics = (run.summary.get("metrics") or {}) if run.summary else {}
        out["runs"][run.label] = {
            "path": str(run.path),
            "method": run.method,
            "pairs": len(run.rows),
            "entropy": entropy_summary(ent),
            "accuracy": metrics.get("accuracy"),
            "answer_entropy": metrics.get("answer_entropy"),
            "diversity": cross_profile_diversity(run.rows, group_field, min_rows) if run.rows else None,
            "distinct": generation_diversity(run.generations),
        }
    return out


def _unique_labels(runs: Sequence[RunOutputs]) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        if run.label in seen:
            seen[run.label] += 1
            run.label = f"{run.label} ({run.path.name})" if run.path.name != run.label else f"{run.label}#{seen[run.label]}"
        else:
            seen[run.label] = 1


def _fmt(v: Any, d: int = 3) -> str:
    return "-" if v is None else f"{v:.{d}f}"


def _markdown(result: Mapping[str, Any], figures: Sequence[str]) -> str:
    lines = [
        "# Mean-collapse diagnostics",
        "",
        f"Groups for cross-profile diversity: `{result['group_field']}`. Entropy: per-pair normalised entropy of the "
        "option distribution (1 = uniform). Diversity: per question, mean pairwise JS divergence (bits) between the "
        "groups' mean predicted distributions vs the same on the gold answers; ratio of the means (1 = as diverse "
        "as the people, 0 = every group answered alike).",
        "",
        "| run | method | pairs | accuracy | entropy mean | p10 | p50 | p90 | share > 0.9 | diversity pred | "
        "diversity gold | ratio | distinct-1 | distinct-2 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in result["runs"].items():
        e = r["entropy"]
        q = e.get("quantiles", {})
        dv = r["diversity"] or {}
        ds = r["distinct"]
        d1 = _fmt(ds.get("distinct_1")) if ds.get("status") == "ok" else "no generations"
        d2 = _fmt(ds.get("distinct_2")) if ds.get("status") == "ok" else "no generations"
        lines.append(
            f"| {label} | {r['method'] or '-'} | {r['pairs']} | {_fmt(r['accuracy'])} | {_fmt(e.get('mean'))} | "
            f"{_fmt(q.get('p10'))} | {_fmt(q.get('p50'))} | {_fmt(q.get('p90'))} | {_fmt(e.get('share_above_0.9'))} | "
            f"{_fmt(dv.get('predicted_mean'))} | {_fmt(dv.get('gold_mean'))} | {_fmt(dv.get('ratio_of_means'))} | "
            f"{d1} | {d2} |"
        )
    lines += ["", "Figures: " + ", ".join(f"`{Path(f).name}`" for f in figures) if figures else "No figures.", ""]
    return "\n".join(lines)


def _figures(result: Mapping[str, Any], runs: Sequence[RunOutputs], out: Path) -> list[str]:
    from .topology import _plt

    plt = _plt()
    labels = [r.label for r in runs if r.rows]
    paths: list[str] = []
    if labels:
        ents = [prediction_entropies(r.rows) for r in runs if r.rows]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(7.0, 1.4 * len(labels) + 5), 3.8))
        if all(len(e) > 1 for e in ents):
            a1.violinplot(ents, showmeans=True, showmedians=False)
        else:
            a1.boxplot(ents)
        a1.set_xticks(range(1, len(labels) + 1))
        a1.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        a1.set_ylabel("normalised entropy")
        a1.set_ylim(-0.02, 1.02)
        a1.set_title("prediction entropy per pair", fontsize=10)
        for lab, e in zip(labels, ents):
            a2.hist(np.clip(e, 0, 1), bins=20, range=(0, 1), histtype="step", lw=1.5, label=lab)
        a2.set_xlabel("normalised entropy")
        a2.set_ylabel("pairs")
        a2.legend(fontsize=7)
        a2.set_title("histogram", fontsize=10)
        fig.tight_layout()
        p = out / "entropy.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(str(p))

        fig, (b1, b2) = plt.subplots(1, 2, figsize=(10, 4))
        top = 0.0
        for lab in labels:
            pq = (result["runs"][lab]["diversity"] or {}).get("per_question", {})
            pts = [(v["gold"], v["predicted"]) for v in pq.values() if v["gold"] is not None and v["predicted"] is not None]
            if pts:
                xs, ys = zip(*pts)
                b1.scatter(xs, ys, s=18, label=lab, alpha=0.8)
                top = max(top, max(xs), max(ys))
        top = top or 1.0
        b1.plot([0, top], [0, top], color="grey", lw=0.8, ls="--")
        b1.set_xlabel("gold: mean pairwise JS between groups")
        b1.set_ylabel("predicted: mean pairwise JS")
        b1.set_title("cross-profile diversity per question", fontsize=10)
        b1.legend(fontsize=7)
        ratios = [(result["runs"][lab]["diversity"] or {}).get("ratio_of_means") for lab in labels]
        b2.bar(range(len(labels)), [r if r is not None else 0.0 for r in ratios], color="tab:blue")
        b2.axhline(1.0, color="grey", lw=0.8, ls="--")
        b2.set_xticks(range(len(labels)))
        b2.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        b2.set_ylabel("predicted / gold diversity")
        b2.set_title("diversity ratio (1 = human-level)", fontsize=10)
        fig.tight_layout()
        p = out / "diversity.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(str(p))
    gen = [(r.label, result["runs"][r.label]["distinct"]) for r in runs if result["runs"][r.label]["distinct"].get("status") == "ok"]
    if gen:
        fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(gen) + 3), 3.6))
        x = np.arange(len(gen))
        ax.bar(x - 0.2, [d.get("distinct_1") or 0 for _, d in gen], width=0.4, label="distinct-1")
        ax.bar(x + 0.2, [d.get("distinct_2") or 0 for _, d in gen], width=0.4, label="distinct-2")
        ax.set_xticks(x)
        ax.set_xticklabels([lab for lab, _ in gen], rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=8)
        ax.set_title("distinct-n of generations (pooled)", fontsize=10)
        fig.tight_layout()
        p = out / "distinct.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(str(p))
    return paths


def write_collapse_report(
    run_dirs: Sequence, out, group_field: str = "country", labels: Optional[Sequence[str]] = None, min_rows: int = 1
) -> dict[str, Any]:
    """Read the run folders, write ``collapse.json``, ``collapse.md`` and the PNGs to ``out``; returns the result."""
    from ..runinfo import atomic_write_json, atomic_write_text, staged_directory

    if not run_dirs:
        raise ValueError("give at least one run folder (--runs DIR ...)")
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs")
    runs = [load_run(d, labels[i] if labels else None) for i, d in enumerate(run_dirs)]
    if labels is None:
        _unique_labels(runs)
    result = analyze_runs(runs, group_field=group_field, min_rows=min_rows)
    with staged_directory(out, last=("collapse.json",)) as stage:  # a failure leaves no partial report
        figures = _figures(result, runs, stage)
        result["figures"] = [Path(f).name for f in figures]
        atomic_write_json(stage / "collapse.json", result)
        atomic_write_text(stage / "collapse.md", _markdown(result, figures))
    return result
