"""Win-rate of a candidate model against a reference on held-out prompts (``cuma eval winrate``; DESIGN decision 7).

Both models answer the same prompts (the unique (conversation, turn) prompts of ``DIR/pairs_{split}.jsonl``,
optionally a seeded subsample), with the same seeded sampling; think blocks are stripped from the answers; a judge
compares each pair in both orders (:func:`cuma.evaluate.judges.judge_pair`). Reported:

* wins / ties / losses / invalid (unparseable verdicts, excluded from ``n``),
* tie-adjusted win-rate ``(wins + 0.5 ties) / n`` with a percentile bootstrap 95% interval (seeded),
* inconsistency rate: share of valid pairs whose two orders disagreed (counted as ties),
* the same per profile group (``--group-by``, default country),
* distinct-1 / distinct-2 of each model's answers, pooled and within / between groups
  (:mod:`cuma.evaluate.diversity`).

Outputs (each written atomically, ``summary.json`` last): ``generations.jsonl`` (``{"id", "profile_text",
"group", "model": "candidate" | "reference", "text", "profile_index"}``), ``verdicts.jsonl`` and ``summary.json``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np

from ..data.conversations import prompt_messages, strip_think

__all__ = ["collect_prompts", "generate_texts", "group_breakdown", "run_winrate", "winrate_stats"]

SCORE = {"win": 1.0, "tie": 0.5, "loss": 0.0}


# ---------------------------------------------------------------------------------------------------------- stats


def winrate_stats(results: Sequence[Any], n_boot: int = 2000, seed: int = 0, confidence: float = 0.95) -> dict:
    """Counts, tie-adjusted win-rate, bootstrap interval and inconsistency rate.

    ``results``: outcome strings (``"win"``, ``"tie"``, ``"loss"``, ``"invalid"``) or :func:`judge_pair` dicts
    (``outcome`` and ``consistent``). Invalid results are counted but excluded from ``n``. The interval is the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` percentiles of ``n_boot`` resampled means (seeded);
    None when ``n`` is 0."""
    outcomes, consistent = [], []
    for r in results:
        if isinstance(r, Mapping):
            outcomes.append(r["outcome"])
            consistent.append(r.get("consistent"))
        else:
            outcomes.append(r)
            consistent.append(None)
    bad = [o for o in outcomes if o not in SCORE and o != "invalid"]
    if bad:
        raise ValueError(f"unknown outcomes {sorted(set(map(str, bad)))}; expected win, tie, loss or invalid")
    wins, ties, losses = (outcomes.count(k) for k in ("win", "tie", "loss"))
    invalid = outcomes.count("invalid")
    n = wins + ties + losses
    scores = np.array([SCORE[o] for o in outcomes if o in SCORE], dtype=np.float64)
    out: dict[str, Any] = {
        "n": n, "wins": wins, "ties": ties, "losses": losses, "invalid": invalid, "total": len(outcomes),
        "win_rate": float(scores.mean()) if n else None,
        "ci_low": None, "ci_high": None, "confidence": confidence, "bootstrap_samples": n_boot,
        "inconsistent": sum(1 for o, c in zip(outcomes, consistent) if o in SCORE and c is False),
        "inconsistency_rate": None,
        "invalid_rate": invalid / len(outcomes) if outcomes else None,
    }
    if n:
        out["inconsistency_rate"] = out["inconsistent"] / n
        rng = np.random.default_rng(seed)
        means = np.empty(n_boot)
        step = max(1, 2_000_000 // max(n, 1))
        for s in range(0, n_boot, step):
            k = min(step, n_boot - s)
            means[s:s + k] = scores[rng.integers(0, n, size=(k, n))].mean(axis=1)
        lo, hi = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
        out["ci_low"], out["ci_high"] = float(lo), float(hi)
    return out


def group_breakdown(results: Sequence[Mapping[str, Any]], groups: Sequence[Any], n_boot: int = 2000,
                    seed: int = 0) -> dict[str, dict]:
    """:func:`winrate_stats` per group label (sorted by label)."""
    by: dict[str, list] = {}
    for r, g in zip(results, groups):
        by.setdefault(str(g), []).append(r)
    return {g: winrate_stats(rs, n_boot=n_boot, seed=seed) for g, rs in sorted(by.items())}


# ---------------------------------------------------------------------------------------------------------- prompts


def collect_prompts(pairs: Sequence[Mapping[str, Any]], num_samples: Optional[int] = None, seed: int = 0,
                    group_by: str = "country", first_turn_only: bool = False) -> list[dict[str, Any]]:
    """Unique prompts of pair records (one per conversation x user x turn), sorted by id, then a seeded subsample
    of ``num_samples``. Each item: ``id``, ``prompt``, ``profile_text``, ``profile_index``, ``profile``, ``group``,
    ``chosen`` (the data's chosen response)."""
    items: dict[str, dict] = {}
    for r in pairs:
        for key in ("id", "prompt", "profile_text"):
            if key not in r:
                raise ValueError(f"pair record {r.get('id', '?')!r} lacks {key!r} (docs/preference-schema.md)")
        if first_turn_only and int(r.get("turn", 0)) != 0:
            continue
        pid = str(r["id"]).rsplit(":r", 1)[0]
        if pid in items:
            continue
        profile = r.get("profile") or {}
        g = profile.get(group_by) if isinstance(profile, Mapping) else None
        if g is None and isinstance(profile, Mapping):
            g = (profile.get("extra") or {}).get(group_by)
        items[pid] = {"id": pid, "prompt": r["prompt"], "profile_text": r["profile_text"],
                      "profile_index": r.get("profile_index"), "profile": profile,
                      "group": str(g) if g is not None else "unknown", "chosen": r.get("chosen")}
    ordered = [items[k] for k in sorted(items)]
    if num_samples is not None and num_samples < len(ordered):
        pick = np.random.default_rng([int(seed), 23]).permutation(len(ordered))[:num_samples]
        ordered = [ordered[i] for i in sorted(pick.tolist())]
    return ordered


# ---------------------------------------------------------------------------------------------------------- generation


def generate_texts(model, tokenizer, items: Sequence[Mapping[str, Any]], *, profile_in_prompt: bool,
                   profile_table=None, max_new_tokens: int = 256, do_sample: bool = True, temperature: float = 0.7,
                   top_p: float = 0.9, seed: int = 0, batch_size: int = 8) -> list[str]:
    """Answers of ``model`` to each item's prompt (chat template, left padding); batch ``b`` is sampled after
    ``torch.manual_seed(seed + b)`` so two models see the same random streams. ``profile_table``: pass rows
    ``item["profile_index"]`` as ``profile_embeds`` (methods that route on the profile)."""
    import torch

    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    texts: list[str] = []
    try:
        for b, start in enumerate(range(0, len(items), batch_size)):
            part = items[start:start + batch_size]
            prompts = [tokenizer.apply_chat_template(prompt_messages(it, profile_in_prompt), tokenize=False,
                                                     add_generation_prompt=True) for it in part]
            enc = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
            kwargs: dict[str, Any] = dict(input_ids=enc["input_ids"].to(device),
                                          attention_mask=enc["attention_mask"].to(device),
                                          max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            if do_sample:
                kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
            else:
                kwargs.update(do_sample=False)
            if profile_table is not None:
                idx = [it.get("profile_index") for it in part]
                if any(i is None or not 0 <= int(i) < profile_table.shape[0] for i in idx):
                    raise ValueError(f"profile_index {idx} out of range for a {profile_table.shape[0]}-row table")
                kwargs["profile_embeds"] = profile_table[torch.as_tensor([int(i) for i in idx])].to(device)
            torch.manual_seed(seed + b)
            with torch.no_grad():
                out = model.generate(**kwargs)
            width = enc["input_ids"].shape[1]
            texts.extend(tokenizer.decode(row[width:], skip_special_tokens=True) for row in out)
    finally:
        tokenizer.padding_side = old_side
    return texts


# ---------------------------------------------------------------------------------------------------------- run


async def _judge_all(judge, items, cand, ref) -> list[dict]:
    from .judges import judge_pair

    return list(await asyncio.gather(*[judge_pair(judge, it["prompt"], it["profile_text"], c, r)
                                       for it, c, r in zip(items, cand, ref)]))


def check_judge_args(args) -> None:
    """The HTTP judge's options, checked before anything is generated (built without cache and key, then closed)."""
    from .judges import HTTPJudge

    if args.judge == "http":
        if not args.judge_url or not args.judge_model:
            raise ValueError("--judge http needs --judge-url and --judge-model")
        HTTPJudge(args.judge_url, args.judge_model, api_key_env=None, timeout=args.judge_timeout,
                  max_retries=args.judge_retries, concurrency=args.judge_concurrency).close()


def make_judge(args):
    from .judges import HTTPJudge, TransformersJudge

    cache = args.judge_cache if args.judge_cache else os.path.join(args.out, "judge_cache")
    if args.judge == "http":
        if not args.judge_url or not args.judge_model:
            raise ValueError("--judge http needs --judge-url and --judge-model")
        return HTTPJudge(args.judge_url, args.judge_model, api_key_env=args.judge_api_key_env,
                         timeout=args.judge_timeout, max_retries=args.judge_retries,
                         concurrency=args.judge_concurrency, cache_dir=cache)
    from .. import models

    jm, jt = models.load_base_and_tokenizer(args.judge_model or "smollm2-135m")
    return TransformersJudge(jm, jt, mode=args.judge_mode, cache_dir=cache, model_name=args.judge_model or "smollm2-135m")


def _load_side(models_mod, methods_mod, model_name, adapter, method, dtype):
    """(BuiltMethod, tokenizer) for one side: an adapter folder, a prompting method, or the bare base (vanilla)."""
    base, tok = models_mod.load_base_and_tokenizer(model_name, dtype=dtype)
    if adapter:
        if not os.path.isdir(adapter):
            raise FileNotFoundError(f"adapter folder {adapter} does not exist")
        return methods_mod.load(method, base, adapter), tok
    return methods_mod.build(method or "vanilla", base), tok


def run_winrate(args) -> int:
    import torch

    from .. import methods, models
    from ..data.conversations import read_preference_split
    from ..runinfo import atomic_write_json, sha256_file
    from .diversity import diversity_report
    from .report import package_versions
    from ..data.records import write_jsonl

    t0 = time.perf_counter()
    if not args.candidate_adapter and not args.candidate_method:
        raise ValueError("pass --candidate-adapter DIR (or --candidate-method for a prompting baseline)")
    if args.num_samples is not None and args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    check_judge_args(args)
    pairs = read_preference_split(args.data, "pairs", args.split)
    items = collect_prompts(pairs, args.num_samples, args.seed, args.group_by, args.first_turn_only)
    if not items:
        raise ValueError(f"{args.data}: no prompts in pairs_{args.split}.jsonl")
    device = torch.device(args.device if args.device not in (None, "", "auto") else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    emb_path = os.path.join(args.data, "profile_embeds.safetensors")

    def table_for(built):
        if not built.uses_profile:
            return None
        if not os.path.isfile(emb_path):
            raise FileNotFoundError(f"method {built.name!r} routes on the profile but {emb_path} does not exist")
        from .scoring import load_profile_table

        table = load_profile_table(emb_path)
        if table.shape[1] != built.profile_dim:
            raise ValueError(f"{emb_path}: {table.shape[1]}-d embeddings, adapter expects {built.profile_dim}")
        return table

    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=not args.greedy, temperature=args.temperature,
               top_p=args.top_p, seed=args.seed, batch_size=args.batch_size)
    cand, tok = _load_side(models, methods, args.model, args.candidate_adapter, args.candidate_method, args.dtype)
    cand.model.to(device).eval()
    raw_c = generate_texts(cand.model, tok, items, profile_in_prompt=cand.profile_in_prompt,
                           profile_table=table_for(cand), **gen)
    ref_desc: dict[str, Any]
    if args.reference_adapter or args.reference_method:
        del cand
        ref, rtok = _load_side(models, methods, args.model, args.reference_adapter, args.reference_method, args.dtype)
        ref.model.to(device).eval()
        raw_r = generate_texts(ref.model, rtok, items, profile_in_prompt=ref.profile_in_prompt,
                               profile_table=table_for(ref), **gen)
        ref_desc = {"adapter": args.reference_adapter, "method": ref.record()}
    elif cand.spec.supports_disable:
        with cand.disable_adapter():
            raw_r = generate_texts(cand.model, tok, items, profile_in_prompt=False, profile_table=None, **gen)
        ref_desc = {"adapter": None, "method": "base (candidate adapter disabled, no profile in the prompt)"}
    else:
        del cand
        ref, rtok = _load_side(models, methods, args.model, None, "vanilla", args.dtype)
        ref.model.to(device).eval()
        raw_r = generate_texts(ref.model, rtok, items, profile_in_prompt=False, profile_table=None, **gen)
        ref_desc = {"adapter": None, "method": "vanilla base"}
    t_gen = time.perf_counter()
    cand_texts = [strip_think(t) for t in raw_c]
    ref_texts = [strip_think(t) for t in raw_r]

    judge = make_judge(args)
    try:
        results = asyncio.run(_judge_all(judge, items, cand_texts, ref_texts))
    finally:
        judge.close()
    t_judge = time.perf_counter()
    groups = [it["group"] for it in items]
    overall = winrate_stats(results, n_boot=args.bootstrap, seed=args.seed)
    summary = {
        "task": "winrate",
        "metrics": {
            **overall,
            "per_group": group_breakdown(results, groups, n_boot=args.bootstrap, seed=args.seed),
            "diversity": {"candidate": diversity_report(cand_texts, groups),
                          "reference": diversity_report(ref_texts, groups)},
            "think_blocks_stripped": {"candidate": sum(a != b.strip() for a, b in zip(cand_texts, raw_c)),
                                      "reference": sum(a != b.strip() for a, b in zip(ref_texts, raw_r))},
        },
        "counts": {"prompts": len(items), "pairs_in_split": len(pairs), "groups": len(set(groups)),
                   "invalid": overall["invalid"]},
        "judge": judge.describe(),
        "run": {
            "config": {k: v for k, v in vars(args).items() if not k.startswith("_")},
            "candidate": {"adapter": args.candidate_adapter, "method": args.candidate_method},
            "reference": ref_desc,
            "data_sha256": {f: sha256_file(os.path.join(args.data, f)) for f in
                            (f"pairs_{args.split}.jsonl", "manifest.json", "profile_embeds.safetensors")
                            if os.path.isfile(os.path.join(args.data, f))},
            "packages": package_versions(),
            "timing": {"generate_s": round(t_gen - t0, 3), "judge_s": round(t_judge - t_gen, 3)},
        },
    }
    os.makedirs(args.out, exist_ok=True)
    gens = []
    for it, c, r in zip(items, cand_texts, ref_texts):
        for name, text in (("candidate", c), ("reference", r)):
            gens.append({"id": it["id"], "profile_text": it["profile_text"], "group": it["group"], "model": name,
                         "text": text, "profile_index": it["profile_index"]})
    write_jsonl(os.path.join(args.out, "generations.jsonl"), gens)
    write_jsonl(os.path.join(args.out, "verdicts.jsonl"),
                [{"id": it["id"], "group": it["group"], "profile_text": it["profile_text"], **res}
                 for it, res in zip(items, results)])
    atomic_write_json(os.path.join(args.out, "summary.json"), summary)
    wr = overall["win_rate"]
    print(f"win-rate {wr if wr is None else round(wr, 4)} [{overall['ci_low']}, {overall['ci_high']}] over "
          f"{overall['n']} prompts: {overall['wins']} wins, {overall['ties']} ties, {overall['losses']} losses, "
          f"{overall['invalid']} invalid; inconsistency {overall['inconsistency_rate']}\nwrote {args.out}")
    return 0
