"""Can an unseen profile be routed better at inference alone? Scores a trained CuMA adapter on the VALID split of
a demo population (the test split is never used to choose settings) with two inference-time changes, the trained
weights untouched:

- ``--neighbours k``: a profile that training did not see (every held-out country's, and the seen countries'
  new combinations of age, gender and religion) is routed as the mean embedding of its k nearest training profiles,
  by cosine after centring on the training profiles' mean (on the demo's populations the nearest training profile
  of a held-out one is a zone-mate for 95-100% of them). 0 = its own embedding (what CuMA does).
- ``--top-k n``: the routers' top-k at inference (the adapter was trained with 2).

    python experiments/demo/demo_investigation.py --steps 50 --data runs/inv/data_s --valid-limit 200 --seed 0 \\
        --work runs/zs/p0s0 --runs lin_fastc_rlr6e-3_lr2e-3_split2:cuma
    python experiments/demo/zeroshot_inference.py --data runs/inv/data_s --valid-limit 200 \\
        --adapter runs/zs/p0s0/lin_fastc_rlr6e-3_lr2e-3_split2/adapters/cuma --neighbours 0,1,5 --top-k 2,1,8

One JSON row per setting: seen-country accuracy, EMD and entropy, zero-shot accuracy and EMD (held-out countries),
and the accuracy on the seen-country pairs whose profile training did not see.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from cuma import methods
from cuma.data.records import load_prepared
from cuma.evaluate.choice import compute_metrics
from cuma.evaluate.scoring import score_records
from cuma.models import load_base_and_tokenizer
from cuma.runinfo import atomic_write_json

from _shared import valid_subset


def neighbour_table(profile_embeds: torch.Tensor, train_rows: list[int], k: int) -> torch.Tensor:
    """``profile_embeds`` with every row outside ``train_rows`` replaced by the mean of its k nearest training rows
    (cosine of the rows centred on the training rows' mean); training rows are kept as they are."""
    if k <= 0:
        return profile_embeds
    bank = profile_embeds[train_rows]
    centred = torch.nn.functional.normalize(profile_embeds - bank.mean(0), dim=-1)
    nearest = (centred @ centred[train_rows].T).topk(min(k, len(train_rows)), dim=1).indices
    table = profile_embeds.clone()
    unseen = torch.ones(profile_embeds.shape[0], dtype=torch.bool)
    unseen[train_rows] = False
    table[unseen] = bank[nearest[unseen]].mean(1)
    return table


def _ints(text: str, option: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"{option}: expected comma-separated integers, got {text!r}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a demo data folder (with prepared/), e.g. runs/inv/data_s")
    p.add_argument("--adapter", required=True, help="a trained CuMA adapter folder")
    p.add_argument("--valid-limit", type=int, default=None, help="score only the first N seen + N/2 held-out pairs")
    p.add_argument("--neighbours", default="0,1,5", help="k values (0 = the profile's own embedding)")
    p.add_argument("--top-k", default="2", help="router top-k values at inference")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", default=None, help="write the rows here too")
    args = p.parse_args()
    neighbours, top_ks = _ints(args.neighbours, "--neighbours"), _ints(args.top_k, "--top-k")
    prepared = Path(args.data) / "prepared"
    if not prepared.is_dir():
        raise SystemExit(f"--data: {prepared} is not a folder (make it with demo_investigation.py --prepare-only)")
    data = load_prepared(prepared)
    valid = valid_subset(data.valid, args.valid_limit)
    train_rows = sorted({r["profile_index"] for r in data.train})
    in_train = set(train_rows)
    base, tokenizer = load_base_and_tokenizer("smollm2-135m", dtype="float32")
    built = methods.load(None, base, args.adapter)
    if not built.uses_profile:
        raise SystemExit(f"--adapter: {args.adapter} does not route on the profile (a CuMA adapter is needed)")
    model = built.model.eval()
    rows = []
    for top_k, k in itertools.product(top_ks, neighbours):
        for config in model.peft_config.values():  # the layers read the config object at every forward
            config.top_k = top_k
        preds = score_records(model, tokenizer, valid, batch_size=args.batch_size, progress=False,
                              profile_table=neighbour_table(data.profile_embeds, train_rows, k),
                              profile_in_prompt=built.profile_in_prompt)
        seen = [x for x in preds if not x["held_out"]]
        held = [x for x in preds if x["held_out"]]
        new = [x for x, r in zip(preds, valid) if not r["held_out"] and r["profile_index"] not in in_train]
        m_seen, m_held = compute_metrics(seen, per_question=False), compute_metrics(held, per_question=False)
        row = {
            "adapter": args.adapter, "neighbours": k, "top_k": top_k, "seen_pairs": len(seen),
            "held_out_pairs": len(held), "accuracy": round(m_seen["accuracy"], 4), "emd": round(m_seen["emd"]["mean"], 4),
            "entropy": round(m_seen["entropy"], 4), "zero_shot_accuracy": round(m_held["accuracy"], 4),
            "zero_shot_emd": round(m_held["emd"]["mean"], 4), "seen_new_profile_pairs": len(new),
            "seen_new_profile_accuracy": round(compute_metrics(new, per_question=False)["accuracy"], 4) if new else None,
        }  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        atomic_write_json(args.json, rows)


if __name__ == "__main__":
    main()
