"""`cuma analyze`: routing topology (``routing``) and mean-collapse (``collapse``) analyses. See docs/analysis.md.

    cuma analyze routing --model M --adapter DIR [DIR ...] --data DIR --out DIR [--group-field country]
                         [--layers 0,-1] [--limit N] [--batch-size 16] [--split test] [--human-source gold|truth]
    cuma analyze collapse --runs DIR [DIR ...] --out DIR [--group-field country]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .evaluate import topology as topo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="analyze_task", metavar="TASK")
    sub.required = True
    p = sub.add_parser(
        "routing",
        help="routing topology of trained mixture adapters: expert load per group, routing vs human distance",
        description="Run the evaluation prompts through each adapted model with gate recording on; aggregate gates "
        "per layer and profile group; compare routing distances with the groups' answer-distribution distances. "
        "Writes analysis.json, analysis.md and PNG figures to --out.",
    )
    p.add_argument("--model", default="smollm2-135m", help="base model (hub id, local folder or 'smollm2-135m')")
    p.add_argument("--adapter", nargs="+", action="extend", required=True,
                   help="one or more adapter folders (method read from cuma_method.json), e.g. cuma and cuma-semantic")
    p.add_argument("--label", nargs="+", action="extend", default=None, help="a name per adapter (default: method)")
    p.add_argument("--data", required=True, help="prepared-data folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--split", default="test", help="records whose prompts are routed (default: test)")
    p.add_argument("--group-field", default="country", help="profile field that defines the groups (default country)")
    p.add_argument("--layers", default=None,
                   help="heatmap layers: comma-separated indices into the routed layers (negative from the end) or "
                   "name substrings (default: first, middle, last)")
    p.add_argument("--limit", type=int, default=32, help="prompts per group (default 32; 0 = all)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward (default 16)")
    p.add_argument("--human-source", choices=("gold", "truth"), default="gold",
                   help="human answer distributions: the records' gold answers (default) or, for synthetic data, "
                   "truth.json's true distributions")
    p.add_argument("--human-splits", default="train,valid,test",
                   help="splits whose records give the human answer distributions (default all)")
    p.add_argument("--profile-in-prompt", action=argparse.BooleanOptionalAction, default=None,
                   help="profile sentence in the prompt (default: what the adapter was trained with)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="model dtype (default: the checkpoint's)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.set_defaults(_analyze_run=run_routing)

    c = sub.add_parser(
        "collapse",
        help="mean-collapse diagnostics across evaluation runs (entropy, cross-profile diversity, distinct-n)",
        description="Read predictions.tsv / summary.json (and generations.jsonl when present) of each run folder "
        "written by `cuma eval wvb`; write collapse.json, collapse.md and PNG figures to --out.",
    )
    c.add_argument("--runs", nargs="+", action="extend", required=True, help="evaluation run folders")
    c.add_argument("--label", nargs="+", action="extend", default=None, help="a name per run (default: method)")
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--group-field", default="country", help="profile column that defines the groups (default country)")
    c.add_argument("--min-rows", type=int, default=1,
                   help="a group enters a question's diversity only with at least this many rows (default 1)")
    c.set_defaults(_analyze_run=run_collapse)


def run(args: argparse.Namespace) -> int:
    return int(args._analyze_run(args) or 0)


# ------------------------------------------------------------------------------------------------- routing


def _matrix(m: np.ndarray) -> list[list[Optional[float]]]:
    return [[None if not np.isfinite(x) else round(float(x), 6) for x in row] for row in np.asarray(m, dtype=float)]


def _per_group(groups: Sequence[str], values: np.ndarray) -> dict[str, Any]:
    return {g: (np.round(values[i], 6).tolist() if np.ndim(values[i]) else round(float(values[i]), 6))
            for i, g in enumerate(groups)}  # fmt: skip


def human_side(data, groups: Sequence[str], group_field: str, source: str, splits: Sequence[str]) -> dict[str, Any]:
    """Human answer-distribution distances of ``groups`` from the records of ``splits`` of a PreparedData."""
    records = [r for s in splits for r in data.split(s)]
    dists = topo.human_distributions(records, group_field, source=source, truth=data.truth)
    d, shared = topo.human_distance_matrix(dists, list(groups))
    return {"source": source, "splits": list(splits), "distance": d, "shared_questions": shared}


def routing_report(
    stats: topo.RoutingStats, human_d: np.ndarray, layer_indices: Sequence[int], out_dir: Path, title: str
) -> dict[str, Any]:
    """Numbers and figures of one adapter's routing stats."""
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = stats.groups
    ent = stats.load_entropy()
    pooled = stats.pooled_gate()
    per_layer: dict[str, Any] = {}
    for li, name in enumerate(stats.layers):
        dmat = stats.distances(li)
        per_layer[name] = {
            "mean_gate": _per_group(groups, stats.mean_gate[li]),
            "load_share": _per_group(groups, stats.load_share[li]),
            "load_entropy": _per_group(groups, ent[li]),
            "pooled_gate": np.round(pooled[li], 6).tolist(),
            "pooled_load_entropy": round(topo.normalized_entropy(pooled[li]), 6),
            "distance": _matrix(dmat),
            "correlation": topo.topology_correlation(dmat, human_d),
        }
    all_r = stats.routing(None)
    all_d = stats.distances(None)
    corr_layers = [v["correlation"]["pearson"] for v in per_layer.values() if v["correlation"]["pearson"] is not None]
    n = stats.num_experts
    dead = {name: int(np.sum(pooled[li] < 1.0 / (10 * n))) for li, name in enumerate(stats.layers)}
    pooled_ent = [per_layer[x]["pooled_load_entropy"] for x in stats.layers]
    # figures
    figs = []
    figs.append(topo.plot_load_heatmap(stats, layer_indices, out_dir / "load_heatmap.png", title=f"{title}: expert load per group (* = held out)"))
    dist = np.sqrt(np.clip(all_d, 0, None))  # JS distance (a metric) for the geometry
    coords = topo.classical_mds(dist, 2)
    figs.append(topo.plot_group_map(coords, groups, stats.held_out, out_dir / "routing_map.png",
                                    title=f"{title}: groups by routing (MDS; red star = held out)"))  # fmt: skip
    z = topo.average_linkage(dist)
    figs.append(topo.plot_dendrogram(z, groups, out_dir / "dendrogram.png", title=f"{title}: routing dendrogram",
                                     held_out=stats.held_out))  # fmt: skip
    return {
        "layers": list(stats.layers),
        "num_experts": n,
        "prompts": dict(stats.prompts),
        "tokens": _per_group(groups, stats.tokens[0]) if len(stats.layers) else {},
        "all_layers": {
            "mean_gate": _per_group(groups, all_r),
            "load_entropy": _per_group(groups, np.asarray([topo.normalized_entropy(v) for v in all_r])),
            "top_experts": stats.assignment(None, top=2),
            "distance": _matrix(all_d),
            "mds": _per_group(groups, coords),
            "linkage": np.round(z, 6).tolist(),
            "correlation": topo.topology_correlation(all_d, human_d),
        },
        "per_layer_correlation_mean": float(np.mean(corr_layers)) if corr_layers else None,
        "utilisation": {
            "pooled_load_entropy_min": min(pooled_ent) if pooled_ent else None,
            "pooled_load_entropy_mean": float(np.mean(pooled_ent)) if pooled_ent else None,
            "dead_experts_per_layer": dead,
            "note": "an expert is 'dead' in a layer when its pooled mean gate is below 1/(10 N)",
        },
        "per_layer": per_layer,
        "figures": [str(Path(f).relative_to(out_dir.parent)) for f in figs],
    }


def _progress(enabled: bool, label: str):
    if not enabled:
        return None
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - last[0] > 5:
            last[0] = now
            print(f"[analyze {label}] {done}/{total} prompts", file=sys.stderr, flush=True)

    return report


def analyze_routing(
    model_name: str,
    adapters: Sequence[str],
    data_dir: str,
    out: str,
    *,
    labels: Optional[Sequence[str]] = None,
    split: str = "test",
    group_field: str = "country",
    layers: Optional[str] = None,
    limit: Optional[int] = 32,
    batch_size: int = 16,
    human_source: str = "gold",
    human_splits: Sequence[str] = ("train", "valid", "test"),
    profile_in_prompt: Optional[bool] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    progress: bool = False,
) -> dict[str, Any]:
    """The whole routing analysis; writes ``analysis.json``, ``analysis.md`` and per-adapter figures to ``out``."""
    from . import methods
    from .data.records import load_prepared
    from .models import load_base_and_tokenizer
    from .runinfo import atomic_write_json, atomic_write_text, environment_record, staged_directory

    if labels is not None and len(labels) != len(adapters):
        raise ValueError(f"{len(labels)} labels for {len(adapters)} adapters")
    if human_source == "truth":
        data = load_prepared(data_dir)
        if data.truth is None:
            raise ValueError(f"{data_dir} has no truth.json: --human-source truth needs synthetic data")
    else:
        data = load_prepared(data_dir, truth=False)
    records = data.split(split)
    if not records:
        raise ValueError(f"{data_dir}: split {split!r} has no records")
    # everything is written into a staged folder, moved to `out` only when the analysis is complete
    with staged_directory(out, last=("analysis.json",)) as out_dir:
        result: dict[str, Any] = {
            "config": {"model": str(model_name), "adapters": [str(a) for a in adapters], "data": str(data_dir),
                       "split": split, "group_field": group_field, "layers": layers, "limit": limit,
                       "batch_size": batch_size, "human_source": human_source, "human_splits": list(human_splits),
                       "profile_in_prompt": profile_in_prompt, "device": device, "dtype": dtype},
            "distance": "Jensen-Shannon divergence, base 2 (0..1); maps and dendrograms use its square root",
            "runs": {},
        }  # fmt: skip
        human = None
        used_labels: list[str] = []
        for i, adapter in enumerate(adapters):
            base, tok = load_base_and_tokenizer(model_name, dtype=dtype, device=device)
            built = methods.load(None, base, adapter)
            label = labels[i] if labels else built.name
            if label in used_labels:
                label = f"{label} ({Path(adapter).name})"
            used_labels.append(label)
            table = None
            if built.uses_profile:
                if data.profile_embeds is None:
                    raise ValueError(f"{data_dir} has no profile_embeds.safetensors, which {built.name} routes on")
                if data.profile_embeds.shape[1] != built.profile_dim:
                    raise ValueError(f"profile_embeds width {data.profile_embeds.shape[1]} != the adapter's profile_dim "
                                     f"{built.profile_dim}")  # fmt: skip
                table = data.profile_embeds
            pip = built.profile_in_prompt if profile_in_prompt is None else profile_in_prompt
            t0 = time.perf_counter()
            stats = topo.collect_routing(
                built.model.eval(), tok, records, group_field=group_field, profile_table=table, profile_in_prompt=pip,
                batch_size=batch_size, limit=limit or None, progress=_progress(progress, label),
            )  # fmt: skip
            seconds = time.perf_counter() - t0
            if human is None:
                human = human_side(data, stats.groups, group_field, human_source, human_splits)
                result["groups"] = list(stats.groups)
                result["held_out"] = dict(stats.held_out)
                hd = human["distance"]
                result["human"] = {"source": human_source, "splits": list(human_splits), "distance": _matrix(hd),
                                   "shared_questions": human["shared_questions"].tolist()}  # fmt: skip
                hdist = np.sqrt(np.clip(np.nan_to_num(hd, nan=np.nanmax(hd) if np.isfinite(hd).any() else 1.0), 0, None))
                topo.plot_dendrogram(topo.average_linkage(hdist), stats.groups, out_dir / "human_dendrogram.png",
                                     title="groups by human answer distance", held_out=stats.held_out)  # fmt: skip
                topo.plot_group_map(topo.classical_mds(hdist, 2), stats.groups, stats.held_out, out_dir / "human_map.png",
                                    title="groups by human answer distance (MDS)")  # fmt: skip
                result["figures"] = ["human_dendrogram.png", "human_map.png"]
            elif list(stats.groups) != result["groups"]:
                raise ValueError("adapters routed different groups (same data and --limit should give the same groups)")
            chosen = topo.select_layers(stats.layers, layers)
            safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)
            rep = routing_report(stats, human["distance"], chosen, out_dir / safe, title=label)
            rep.update({"method": built.name, "adapter": str(adapter), "profile_in_prompt": pip,
                        "uses_profile": bool(built.uses_profile), "heatmap_layers": [stats.layers[k] for k in chosen],
                        "seconds": round(seconds, 3)})  # fmt: skip
            result["runs"][label] = rep
            del built, base
        result["comparison"] = [
            {
                "label": lab,
                "method": r["method"],
                "pearson": r["all_layers"]["correlation"]["pearson"],
                "spearman": r["all_layers"]["correlation"]["spearman"],
                "pairs": r["all_layers"]["correlation"]["pairs"],
                "per_layer_pearson_mean": r["per_layer_correlation_mean"],
                "pooled_load_entropy_mean": r["utilisation"]["pooled_load_entropy_mean"],
            }
            for lab, r in result["runs"].items()
        ]
        result["environment"] = environment_record()
        atomic_write_json(out_dir / "analysis.json", result)
        atomic_write_text(out_dir / "analysis.md", _markdown(result))
    return result


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def _markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        "# Routing topology",
        "",
        f"Groups by `{cfg['group_field']}` ({len(result.get('groups', []))}; held out: "
        f"{', '.join(g for g, h in result.get('held_out', {}).items() if h) or 'none'}). Prompts: split "
        f"`{cfg['split']}`, at most {cfg['limit'] or 'all'} per group. Human distance: mean per-question JS divergence "
        f"of the groups' {cfg['human_source']} answer distributions. Routing distance: JS divergence of the "
        "groups' mean gate vectors (all layers averaged).",
        "",
        "| run | method | Pearson | Spearman | pairs | mean per-layer Pearson | mean load entropy |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["comparison"]:
        lines.append(f"| {row['label']} | {row['method']} | {_f(row['pearson'])} | {_f(row['spearman'])} | "
                     f"{row['pairs']} | {_f(row['per_layer_pearson_mean'])} | {_f(row['pooled_load_entropy_mean'])} |")  # fmt: skip
    lines += ["", "Figures per run: `<run>/load_heatmap.png`, `<run>/routing_map.png`, `<run>/dendrogram.png`; "
              "human side: `human_map.png`, `human_dendrogram.png`.", ""]  # fmt: skip
    return "\n".join(lines)


def run_routing(args: argparse.Namespace) -> int:
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else None
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    if args.limit is not None and args.limit < 0:
        raise ValueError("--limit must be >= 0")
    result = analyze_routing(
        args.model, args.adapter, args.data, args.out, labels=args.label, split=args.split,
        group_field=args.group_field, layers=args.layers, limit=args.limit, batch_size=args.batch_size,
        human_source=args.human_source, human_splits=[s for s in args.human_splits.split(",") if s],
        profile_in_prompt=args.profile_in_prompt, device=device, dtype=args.dtype, progress=not args.no_progress,
    )  # fmt: skip
    for row in result["comparison"]:
        print(f"{row['label']}: routing-vs-human distance Pearson {_f(row['pearson'])}, Spearman "
              f"{_f(row['spearman'])} over {row['pairs']} group pairs -> {Path(args.out) / 'analysis.json'}")  # fmt: skip
    return 0


# ------------------------------------------------------------------------------------------------- collapse


def run_collapse(args: argparse.Namespace) -> int:
    from .evaluate.collapse import write_collapse_report

    result = write_collapse_report(args.runs, args.out, group_field=args.group_field, labels=args.label,
                                   min_rows=args.min_rows)  # fmt: skip
    for label, r in result["runs"].items():
        dv = r["diversity"] or {}
        print(f"{label}: entropy mean {_f(r['entropy'].get('mean'))}, diversity ratio "
              f"{_f(dv.get('ratio_of_means'))}, distinct: {r['distinct'].get('status')}")  # fmt: skip
    print(f"-> {Path(args.out) / 'collapse.json'}")
    return 0
