"""Where does `cuma demo` lose zero-shot accuracy? The held-out countries' test pairs of a finished demo, scored as
they are and again with the country swapped for each seen country of the same zone (in the prompt and in the profile
embedding, re-encoded by the same frozen encoder). No training; the demo's adapters are reused.

    python experiments/demo/demo_name_swap.py --work runs/demo --methods cuma,lora

With a zone-mate's name a model is asked about a country it was trained on, with everything else of the participant
unchanged: the difference to the unswapped accuracy is what the unseen name costs; the difference to the held-out
oracle is what the model does not know about the zone. Prints one line per method and one per held-out country.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from cuma import methods
from cuma.data.records import load_prepared
from cuma.encoder import ProfileEncoder
from cuma.evaluate.scoring import score_records
from cuma.models import load_base, load_tokenizer


def swapped_records(held: list[dict], zone_mates: dict[str, list[str]]) -> list[dict]:
    out = []
    for r in held:
        country = r["profile"]["country"]
        for mate in zone_mates[country]:
            text = r["profile_text"].replace(f"Country: {country}.", f"Country: {mate}.")
            if text == r["profile_text"]:
                raise ValueError(f"record {r['id']}: profile text {r['profile_text']!r} does not name {country!r}")
            out.append({**r, "profile": {**r["profile"], "country": mate}, "profile_text": text, "_country": country})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/demo", help="a finished demo's work folder (data/ and adapters/)")
    p.add_argument("--methods", default="cuma,lora")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    data = load_prepared(work / "data" / "prepared")
    truth = json.loads((work / "data" / "raw" / "truth.json").read_text())
    zone = {c: v["zone"] for c, v in truth["countries"].items()}
    held = [r for r in data.test if r["held_out"]]
    held_countries = sorted({r["profile"]["country"] for r in held})
    mates = {c: sorted(x for x in zone if zone[x] == zone[c] and x not in held_countries) for c in held_countries}
    swapped = swapped_records(held, mates)
    # the swapped profiles' embeddings go after the prepared table's rows
    texts = sorted({s["profile_text"] for s in swapped})
    new = ProfileEncoder().encode(texts).to(data.profile_embeds.dtype)
    table = torch.cat([data.profile_embeds, new])
    row = {t: data.profile_embeds.shape[0] + i for i, t in enumerate(texts)}
    for s in swapped:
        s["profile_index"] = row[s["profile_text"]]
    tokenizer = load_tokenizer("smollm2-135m")
    for method in args.methods.split(","):
        built = methods.load(None, load_base("smollm2-135m"), work / "adapters" / method)
        model = built.model.eval()
        profiles = table if built.uses_profile else None
        as_is = score_records(model, tokenizer, held, profile_table=profiles,
                              profile_in_prompt=built.profile_in_prompt, progress=False)
        swap = score_records(model, tokenizer, swapped, profile_table=profiles,
                             profile_in_prompt=built.profile_in_prompt, progress=False)
        right_as_is, right_swap = defaultdict(list), defaultdict(list)
        for r, pred in zip(held, as_is):
            right_as_is[r["profile"]["country"]].append(pred["pred_index"] == pred["gold_index"])
        for s, pred in zip(swapped, swap):
            right_swap[s["_country"]].append(pred["pred_index"] == pred["gold_index"])
        total = lambda d: sum(sum(v) for v in d.values()) / sum(len(v) for v in d.values())  # noqa: E731
        print(f"{method}: held-out pairs as they are {total(right_as_is):.3f}, "
              f"with a seen zone-mate's name {total(right_swap):.3f} ({len(held)} pairs, {len(swapped)} swapped)")
        for c in held_countries:
            a, b = right_as_is[c], right_swap[c]
            print(f"  {c:12s} {sum(a) / len(a):.2f} -> {sum(b) / len(b):.2f}   zone-mates {', '.join(mates[c])}")


if __name__ == "__main__":
    main()
