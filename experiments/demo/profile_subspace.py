"""How much of a profile's centred embedding lies on the directions the training profiles span?

    python experiments/demo/profile_subspace.py --data runs/inv/data_s/prepared

For k leading principal directions of the distinct training profiles' centred embeddings (what
``router_profile_subspace=k`` keeps): the share of the training variance they hold, and the mean share of the squared
norm of a training profile / a held-out (never trained) profile that lies outside them. A router's weights on the
directions outside are never trained, so that part of an unseen profile reaches the routing through its random
initial weights. Also prints how often a held-out profile's nearest seen country (mean cosine) is one of its zone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from cuma.data.records import load_prepared
from cuma.tuners.cuma.model import profile_subspace


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a prepared-data folder of `cuma data synth --prepare`")
    p.add_argument("--ranks", default="8,16,32,64")
    args = p.parse_args()
    root = Path(args.data)
    data = load_prepared(root)
    truth = json.loads((root.parent / "raw" / "truth.json").read_text())
    zone = {c: v["zone"] for c, v in truth["countries"].items()}
    country, held = {}, set()
    for split in (data.train, data.valid, data.test):
        for r in split:
            country[r["profile_index"]] = r["profile"]["country"]
            if r["held_out"]:
                held.add(r["profile_index"])
    train = sorted({r["profile_index"] for r in data.train})
    held_rows = sorted(held)
    table = data.profile_embeds.double()
    mean = table[train].mean(0)
    seen, unseen = table[train] - mean, table[held_rows] - mean
    total = (seen**2).sum()
    print(f"{len(train)} training profiles, {len(held_rows)} held-out profiles, width {table.shape[1]}")
    print("k  train variance held  outside (train)  outside (held-out)")
    for k in (int(x) for x in args.ranks.split(",")):
        basis = torch.tensor(profile_subspace(seen, k), dtype=torch.float64)
        kept = ((seen @ basis.T) ** 2).sum() / total

        def outside(x):
            rest = x - (x @ basis.T) @ basis
            return float(((rest**2).sum(1) / (x**2).sum(1)).mean())

        print(f"{basis.shape[0]:<3}{float(kept):>20.3f}{outside(seen):>17.3f}{outside(unseen):>20.3f}")
    unit_seen = torch.nn.functional.normalize(seen, dim=1)
    unit_held = torch.nn.functional.normalize(unseen, dim=1)
    countries = sorted({country[i] for i in train})
    members = {c: torch.tensor([n for n, i in enumerate(train) if country[i] == c]) for c in countries}
    sim = unit_held @ unit_seen.T
    hits = 0
    for j, i in enumerate(held_rows):
        nearest = max(countries, key=lambda c: float(sim[j, members[c]].mean()))
        hits += zone[nearest] == zone[country[i]]
    print(f"held-out profiles whose nearest seen country is a zone-mate: {hits} of {len(held_rows)}")


if __name__ == "__main__":
    main()
