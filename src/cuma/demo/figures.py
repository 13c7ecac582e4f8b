"""The demo's figures (matplotlib, Agg): metrics per method beside the oracle, predicted vs true answer
distributions on conflicting questions, learning curves, and CuMA's routing map."""

from __future__ import annotations

from pathlib import Path

from .config import METHOD_COLORS, METHOD_LABELS

__all__ = ["write_figures"]


def write_figures(out: Path, summary: dict, results: dict, truth: dict, routing) -> list[str]:
    """The report's PNG figures in ``out``; returns their file names in report order."""
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
