"""Figure of the router diagnosis (docs/demo.md section 1) from rows written by demo_investigation.py --diagnose.

    python experiments/demo/plot_demo_diagnosis.py runs/inv/e1a.json docs/img/demo_router_parts.png

Per adapted projection (model order: layer 0 q_proj, layer 0 v_proj, ...): the RMS of the token part and of the
profile part of the router's first pre-activation, and the spread of the profile part between profiles, for every
(variant, step) row that has them.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    src, dst = sys.argv[1], sys.argv[2]
    rows = [r for r in json.load(open(src)) if r.get("router_parts")]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, axes = plt.subplots(1, len(variants), figsize=(6.5 * len(variants), 3.8), squeeze=False)
    colors = {"token_rms": "#4c72b0", "profile_rms": "#55a868", "profile_spread": "#c44e52"}
    labels = {"token_rms": "token part W_h h", "profile_rms": "profile part W_e e", "profile_spread":
              "profile part, spread between profiles"}
    for ax, variant in zip(axes[0], variants):
        mine = [r for r in rows if r["variant"] == variant]
        for r in mine:
            style = "-" if r["step"] else ":"
            for key in ("token_rms", "profile_rms", "profile_spread"):
                vals = [p.get(key) for p in r["router_parts"]]
                if any(v is not None for v in vals):
                    ax.plot(range(len(vals)), vals, style, color=colors[key], alpha=0.4 + 0.6 * (r["step"] > 0),
                            label=f"{labels[key]}, step {r['step']}")
        ax.set_yscale("log")
        ax.set_xlabel("adapted projection (layer 0 q, layer 0 v, ... layer 29 v)")
        ax.set_ylabel("RMS of the router's first pre-activation")
        ax.set_title(f"{variant} CuMA router input parts", fontsize=10)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
