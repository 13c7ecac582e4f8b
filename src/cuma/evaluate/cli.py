"""``cuma eval wvb``: score a model / adapter on prepared WVB-format data and write predictions.tsv + summary.json.

    cuma eval winrate --model M --candidate-adapter DIR [--reference-adapter DIR] --data DIR --split test
                      --judge http|local [--judge-url URL --judge-model NAME] --out DIR [--num-samples N] [--seed S]
    cuma eval choice  --model M --method vanilla|persona|fewshot [--adapter DIR] --data DIR --out DIR
    cuma eval wvb --model NAME_OR_PATH --method M [--adapter DIR] --data DIR --out DIR [--batch-size 32]
                  [--split test] [--limit N] [--profile-in-prompt/--no-profile-in-prompt] [--fewshot-k K]
                  [--seed 0] [--no-progress] [--device auto] [--dtype auto]

Trained methods (``cuma``, ``lora``, ``prefix``, ``fft``, ...) need ``--adapter`` (the folder
``cuma.methods.save`` / the trainer wrote; ``--method`` may then be left out: it is read from the folder's
``cuma_method.json``). The prompting baselines ``vanilla``, ``persona`` and ``fewshot`` need no adapter.
``docs/evaluation.md`` describes the protocol and every metric.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Optional

# the readers and checks of WVB-format records live with the evaluation API (cuma.evaluate.wvb); re-exported here
from .wvb import (  # noqa: F401
    REQUIRED_FIELDS,
    build_method,
    check_profile_index,
    check_profile_rows,
    check_record_values,
    read_records,
    validate_records,
)
from ..runinfo import check_output_folder

__all__ = ["add_arguments", "run", "run_wvb", "read_records", "validate_records"]



def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_task", metavar="TASK")
    sub.required = True
    p = sub.add_parser(
        "wvb",
        help="multiple-choice survey questions (WorldValuesBench format, real or synthetic)",
        description="Score every (participant, question) pair of a prepared WVB-format split by the option-letter "
        "logits at the answer position and write predictions.tsv and summary.json to --out.",
    )
    p.add_argument("--model", default="smollm2-135m", help="base model: hub id, local folder or 'smollm2-135m' "
                   "(the embedded default)")
    p.add_argument("--method", default=None, help="method name (cuma.methods.list_methods()); default: read from "
                   "--adapter's cuma_method.json")
    p.add_argument("--adapter", default=None, help="folder of the trained adapter / model (trained methods only)")
    p.add_argument("--data", required=True, help="prepared-data folder (cuma data wvb / the synthetic generator)")
    p.add_argument("--out", required=True, help="output folder for predictions.tsv and summary.json")
    p.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty --out")
    p.add_argument("--split", default="test", help="which DATA/{split}.jsonl to score (default: test)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per forward (default 32)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N valid records of the split")
    p.add_argument(
        "--profile-in-prompt",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="put the profile sentence in the system prompt (default: what the method / adapter was trained with)",
    )
    p.add_argument("--fewshot-k", type=int, default=None, help="shots per prompt for --method fewshot "
                   "(default: the method's k)")
    p.add_argument("--seed", type=int, default=0, help="seed (few-shot selection, torch); default 0")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="model dtype, e.g. bfloat16 (default: the checkpoint's)")
    p.set_defaults(_eval_run=run_wvb)
    _add_winrate_parser(sub)
    _add_choice_parser(sub)
    from .opinions_cli import add_parser as _add_opinions_parser  # cuma eval opinions (group-level distributions)
    _add_opinions_parser(sub)


def _add_winrate_parser(sub) -> None:
    w = sub.add_parser(
        "winrate",
        help="judge a candidate against a reference model on held-out preference prompts (PRISM / CA)",
        description="Generate answers of a candidate (adapter) and a reference (base or another adapter) to the "
        "prompts of DATA/pairs_{split}.jsonl, judge every pair in both orders, and write generations.jsonl, "
        "verdicts.jsonl and summary.json (win-rate with bootstrap interval, per group, distinct-n).",
    )
    w.add_argument("--model", default="smollm2-135m", help="base model of both sides")
    w.add_argument("--candidate-adapter", default=None, help="trained adapter folder of the candidate")
    w.add_argument("--candidate-method", default=None,
                   help="method name (default: read from the adapter; a prompting baseline without an adapter)")
    w.add_argument("--reference-adapter", default=None, help="adapter of the reference (default: the base model)")
    w.add_argument("--reference-method", default=None, help="prompting baseline as reference, e.g. persona")
    w.add_argument("--data", required=True, help="prepared preference folder (cuma data prism / ca)")
    w.add_argument("--split", default="test")
    w.add_argument("--out", required=True)
    w.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty --out (the judge cache "
                   "in it is kept and reused)")
    w.add_argument("--num-samples", type=int, default=None, help="seeded subsample of N prompts (default: all)")
    w.add_argument("--first-turn-only", action="store_true", help="only first-turn prompts")
    w.add_argument("--group-by", default="country", help="profile field for the per-group breakdown")
    w.add_argument("--max-new-tokens", type=int, default=256)
    w.add_argument("--temperature", type=float, default=0.7)
    w.add_argument("--top-p", type=float, default=0.9)
    w.add_argument("--greedy", action="store_true", help="greedy decoding instead of seeded sampling")
    w.add_argument("--batch-size", type=int, default=8)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the interval")
    w.add_argument("--judge", choices=("http", "local"), default="local")
    w.add_argument("--judge-url", default=None, help="OpenAI-compatible base URL, e.g. https://api.openai.com/v1")
    w.add_argument("--judge-model", default=None,
                   help="judge model: the endpoint's model name (http) or a local model (default smollm2-135m)")
    w.add_argument("--judge-api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the API key (never logged)")
    w.add_argument("--judge-timeout", type=float, default=60.0)
    w.add_argument("--judge-retries", type=int, default=4)
    w.add_argument("--judge-concurrency", type=int, default=4)
    w.add_argument("--judge-cache", default=None, help="verdict cache folder (default OUT/judge_cache)")
    w.add_argument("--judge-mode", choices=("logits", "generate"), default="logits", help="local judge mode")
    w.add_argument("--device", default="auto")
    w.add_argument("--dtype", default=None)
    w.set_defaults(_eval_run=run_winrate)


def _add_choice_parser(sub) -> None:
    c = sub.add_parser(
        "choice",
        help="Community Alignment 4-way choice accuracy / macro-F1 (vanilla, persona, few-shot or an adapter)",
        description="Score DATA/choice_{split}.jsonl by the option-letter logits at the answer position and write "
        "predictions.jsonl and summary.json.",
    )
    c.add_argument("--model", default="smollm2-135m")
    c.add_argument("--method", default=None, help="vanilla, persona, fewshot or a trained method (with --adapter)")
    c.add_argument("--adapter", default=None)
    c.add_argument("--data", required=True, help="prepared folder of cuma data ca")
    c.add_argument("--out", required=True)
    c.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty --out")
    c.add_argument("--split", default="test")
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--limit", type=int, default=None)
    c.add_argument("--profile-in-prompt", action=argparse.BooleanOptionalAction, default=None)
    c.add_argument("--fewshot-k", type=int, default=None)
    c.add_argument("--fewshot-key", default="country", help="profile field shots are matched on (default country)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--no-progress", action="store_true")
    c.add_argument("--device", default="auto")
    c.add_argument("--dtype", default=None)
    c.set_defaults(_eval_run=run_choice)


def run_winrate(args: argparse.Namespace) -> int:
    check_output_folder(args.out, "--out", overwrite=getattr(args, "overwrite", False))
    from .winrate import run_winrate as _run

    return _run(args)


CHOICE_SYSTEM = "You are helping a user choose between candidate responses to their message."
CHOICE_INSTRUCTION = "Which response would you prefer? Answer with the letter only."


def choice_messages(record: dict, profile_in_prompt: bool, fewshot=None) -> list[dict]:
    """System (+ profile), few-shot items as user/assistant turns, then the item: the conversation, the lettered
    responses and the instruction."""

    def user_text(rec: dict) -> str:
        convo = "\n".join(f"{m['role']}: {m['content']}" for m in rec["prompt"])
        opts = "\n".join(f"{l}. {o}" for l, o in zip(rec["letters"], rec["options"]))
        return f"Conversation:\n{convo}\n\nResponses:\n{opts}\n{CHOICE_INSTRUCTION}"

    system = CHOICE_SYSTEM
    if profile_in_prompt and str(record.get("profile_text") or "").strip():
        system += f"\nAbout you: {record['profile_text'].strip()}"
    msgs = [{"role": "system", "content": system}]
    for shot in fewshot or ():
        msgs += [{"role": "user", "content": user_text(shot)}, {"role": "assistant", "content": shot["gold_letter"]}]
    msgs.append({"role": "user", "content": user_text(record)})
    return msgs


def run_choice(args: argparse.Namespace) -> int:
    check_output_folder(args.out, "--out", overwrite=getattr(args, "overwrite", False))
    import numpy as np
    import torch

    from .. import models
    from ..data.conversations import read_preference_split
    from ..data.prompts import letter_token_ids
    from ..data.records import write_jsonl
    from .fewshot import select_fewshot
    from .choice import accuracy, country_accuracy, macro_f1, mean_normalized_entropy
    from .report import atomic_write_json, package_versions
    from .scoring import load_profile_table, score_prompts

    from ..data.records import SPLITS, read_jsonl_numbered

    t0 = time.perf_counter()
    if args.split not in SPLITS:
        raise ValueError(f"--split: unknown split {args.split!r}; expected one of {list(SPLITS)}")
    choice_path = os.path.join(args.data, f"choice_{args.split}.jsonl")
    numbered = read_jsonl_numbered(choice_path)
    for lineno, r in numbered:
        check_profile_index(r, f"{choice_path}:{lineno}: record {r.get('id')!r}")
    raw = [r for _, r in numbered]
    records, dropped = [], {}
    for r in raw:
        ok = (isinstance(r.get("letters"), list) and isinstance(r.get("options"), list)
              and len(r["letters"]) == len(r["options"]) >= 2 and r.get("gold_letter") in r["letters"]
              and isinstance(r.get("prompt"), list))
        if not ok:
            dropped["malformed choice record"] = dropped.get("malformed choice record", 0) + 1
            continue
        records.append(r)
    if args.limit is not None and len(records) > args.limit:
        dropped[f"beyond --limit {args.limit}"] = len(records) - args.limit
        records = records[: args.limit]
    if not records:
        raise ValueError(f"{args.data}: no choice records to score in split {args.split} (dropped: {dropped})")
    torch.manual_seed(args.seed)
    device = _resolve_device(args.device)
    try:
        base, tokenizer = models.load_base_and_tokenizer(args.model, dtype=args.dtype)
    except models.ModelLoadError as err:
        raise ValueError(str(err)) from err
    built, method = _build_method(args, base)
    model = built.model.to(device).eval()
    pip = built.profile_in_prompt if args.profile_in_prompt is None else bool(args.profile_in_prompt)
    k = int(built.options.get("k") or 0) if built.prompt_mode == "fewshot" else 0
    pool = read_preference_split(args.data, "choice", "train") if k else None
    if k and not pool:
        raise ValueError(f"few-shot needs training items: {args.data}/choice_train.jsonl is empty")
    fseed = int(built.options.get("seed") or args.seed) if k else args.seed
    prompts = []
    for r in records:
        shots = select_fewshot(pool, r, k, seed=fseed, key=args.fewshot_key) if k else None
        prompts.append(tokenizer.apply_chat_template(choice_messages(r, pip, shots), tokenize=False,
                                                     add_generation_prompt=True))
    cache: dict = {}
    letter_ids = []
    for r in records:
        key = tuple(r["letters"])
        if key not in cache:
            cache[key] = letter_token_ids(tokenizer, list(key))
        letter_ids.append(cache[key])
    rows = None
    if built.uses_profile:
        emb = os.path.join(args.data, "profile_embeds.safetensors")
        if not os.path.isfile(emb):
            raise FileNotFoundError(f"method {method!r} routes on the profile but {emb} does not exist")
        table = load_profile_table(emb)
        kept = {id(r) for r in records}
        missing = next(((n, r) for n, r in numbered if id(r) in kept and r.get("profile_index") is None), None)
        if missing is not None:
            raise ValueError(f"{choice_path}:{missing[0]}: record {missing[1].get('id')!r} has no profile_index; "
                             f"method {method!r} routes on the profile (a row of {emb})")
        check_profile_rows(numbered, choice_path, table.shape[0], emb, keep=records)
        if table.shape[1] != built.profile_dim:
            raise ValueError(f"{emb} holds {table.shape[1]}-d profile embeddings but the adapter was built with "
                             f"profile_dim={built.profile_dim}")
        rows = table[torch.as_tensor([int(r["profile_index"]) for r in records])]
    dists = score_prompts(model, tokenizer, prompts, letter_ids, batch_size=args.batch_size, profile_rows=rows,
                          progress=not args.no_progress, desc=f"choice {method}")
    preds = []
    for r, p in zip(records, dists):
        i = int(np.argmax(p))
        preds.append({"id": r["id"], "conversation_id": r["conversation_id"], "user_id": r["user_id"],
                      "profile": r.get("profile") or {}, "gold_letter": r["gold_letter"], "pred_letter": r["letters"][i],
                      "correct": r["letters"][i] == r["gold_letter"],
                      "probs": {l: float(x) for l, x in zip(r["letters"], p)}})
    gold = [p["gold_letter"] for p in preds]
    pred = [p["pred_letter"] for p in preds]
    letters = sorted({l for r in records for l in r["letters"]})
    metrics = {
        "items": len(preds),
        "accuracy": accuracy(gold, pred),
        "macro_f1": macro_f1(gold, pred, labels=letters),
        "entropy": mean_normalized_entropy([list(p["probs"].values()) for p in preds]),
        "predicted_letters": {l: pred.count(l) for l in letters},
        "gold_letters": {l: gold.count(l) for l in letters},
        "country": country_accuracy([p["profile"].get("country") for p in preds], [p["correct"] for p in preds]),
    }
    summary = {
        "task": "choice",
        "metrics": metrics,
        "counts": {"records_in_split": len(raw), "items": len(preds), "dropped": dropped,
                   "conversations": len({p["conversation_id"] for p in preds})},
        "run": {"config": {"model": args.model, "method": method, "adapter": args.adapter, "data": args.data,
                           "split": args.split, "profile_in_prompt": pip, "fewshot_k": k, "seed": args.seed,
                           "padding_side": tokenizer.padding_side, "device": str(device)},
                "method": built.record(), "packages": package_versions(),
                "timing": {"total_s": round(time.perf_counter() - t0, 3)}},
    }
    os.makedirs(args.out, exist_ok=True)
    write_jsonl(os.path.join(args.out, "predictions.jsonl"), preds)
    atomic_write_json(os.path.join(args.out, "summary.json"), summary)
    print(f"{method}: {len(preds)} items, acc {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}\n"
          f"wrote {args.out}")
    return 0


def run(args: argparse.Namespace) -> int:
    return int(args._eval_run(args) or 0)


# ----------------------------------------------------------------------------------------------- run


def _resolve_device(name: str):
    import torch

    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _files_sha(folder: Optional[str], names: tuple[str, ...]) -> dict[str, str]:
    from ..runinfo import sha256_file

    if not folder or not os.path.isdir(folder):
        return {}
    return {n: sha256_file(os.path.join(folder, n)) for n in names if os.path.isfile(os.path.join(folder, n))}


def _build_method(args, base):
    """(BuiltMethod, method name) for ``cuma eval wvb``'s --method / --adapter (:func:`cuma.evaluate.wvb.build_method`)."""
    return build_method(args.method, args.adapter, base, profile_in_prompt=args.profile_in_prompt,
                        fewshot_k=args.fewshot_k, seed=args.seed)


def run_wvb(args: argparse.Namespace) -> int:
    """``cuma eval wvb``; ``--no-progress`` also silences the loading bars of transformers for the run."""
    check_output_folder(args.out, "--out", overwrite=getattr(args, "overwrite", False))
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if args.no_progress:
        hf_logging.disable_progress_bar()
    try:
        return _run_wvb(args)
    finally:
        if args.no_progress and was_enabled:
            hf_logging.enable_progress_bar()


def _run_wvb(args: argparse.Namespace) -> int:
    import torch

    from .. import models
    from ..distributed import init_from_env, rank_and_world
    from ..runinfo import read_json
    from .report import atomic_write_json, build_summary, write_predictions_tsv
    from .wvb import WVBEvalConfig, evaluate_wvb

    t0 = time.perf_counter()
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    eval_config = WVBEvalConfig(split=args.split, batch_size=args.batch_size, limit=args.limit,
                                profile_in_prompt=args.profile_in_prompt, progress=not args.no_progress)
    data = args.data
    if not os.path.isdir(data):
        raise FileNotFoundError(f"data folder {data} does not exist; prepare it with cuma data wvb")
    split_path = os.path.join(data, f"{args.split}.jsonl")
    if not os.path.isfile(split_path):
        raise FileNotFoundError(f"{split_path} does not exist (--split {args.split})")
    manifest_path = os.path.join(data, "manifest.json")
    manifest = None
    if os.path.isfile(manifest_path):
        manifest = read_json(manifest_path, dict, what="the prepared-data manifest")

    torch.manual_seed(args.seed)
    device = _resolve_device(args.device)
    init_from_env(device)  # under torchrun / accelerate launch: each rank scores a slice, predictions gathered
    try:
        base, tokenizer = models.load_base_and_tokenizer(args.model, dtype=args.dtype)
    except models.ModelLoadError as err:
        raise ValueError(str(err)) from err
    t_load = time.perf_counter()
    built, method = _build_method(args, base)
    built.model.to(device).eval()
    result = evaluate_wvb(built, tokenizer, data, eval_config)
    preds, metrics, counts = result.predictions, result.metrics, result.counts
    profile_in_prompt, model = result.profile_in_prompt, built.model

    config = {
        "task": "wvb",
        "model": args.model,
        "method": method,
        "adapter": os.path.abspath(args.adapter) if args.adapter else None,
        "data": os.path.abspath(data),
        "split": args.split,
        "out": os.path.abspath(args.out),
        "batch_size": args.batch_size,
        "limit": args.limit,
        "profile_in_prompt": profile_in_prompt,
        "profile_in_prompt_trained": built.profile_in_prompt,
        "uses_profile_embeds": built.uses_profile,
        "fewshot_k": result.fewshot_k,
        "fewshot_key": result.fewshot_key,
        "seed": args.seed,
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype),
        "padding_side": tokenizer.padding_side,
    }
    model_info = {
        "base": _describe(models, args.model),
        "adapter": os.path.abspath(args.adapter) if args.adapter else None,
        "adapter_sha256": _files_sha(
            args.adapter, ("adapter_config.json", "adapter_model.safetensors", "model.safetensors", "cuma_method.json")
        ),
    }
    notes = []
    if profile_in_prompt != built.profile_in_prompt:
        notes.append(f"profile_in_prompt={profile_in_prompt} differs from the method's {built.profile_in_prompt}")
    if manifest is not None:
        model_info["data_manifest"] = {k: manifest.get(k) for k in ("encoder", "seed", "held_out", "options")
                                       if k in manifest}
    timing = {
        "load_s": round(t_load - t0, 3),
        "score_s": round(result.score_seconds, 3),
        "pairs_per_s": round(len(preds) / max(result.score_seconds, 1e-9), 3),
        "total_s": round(time.perf_counter() - t0, 3),
    }
    summary = build_summary(
        metrics,
        counts=counts,
        config=config,
        data_files=result.data_files,
        seed=args.seed,
        model=model_info,
        method=built.record(),
        timing=timing,
        notes=notes,
    )
    if rank_and_world()[0] != 0:
        return 0  # every rank holds the gathered predictions; rank 0 writes them
    os.makedirs(args.out, exist_ok=True)
    write_predictions_tsv(os.path.join(args.out, "predictions.tsv"), preds)
    atomic_write_json(os.path.join(args.out, "summary.json"), summary)
    print(_one_line(method, metrics, counts, args.out))
    return 0


def _describe(models, name: str) -> dict:
    try:
        return models.describe(name)
    except Exception as err:  # describe loads nothing; never fail a finished evaluation on it
        return {"name": name, "error": str(err)}


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.2f}%" if pct else f"{x:.4f}"


def _one_line(method: str, m: dict, counts: dict, out: str) -> str:
    zs = m["zero_shot"]["accuracy"]
    parts = [
        f"{method}: {counts['pairs']} pairs / {counts['questions']} questions",
        f"acc {_fmt(m['accuracy'], True)}",
        f"macro-F1 {_fmt(m['macro_f1'])} (pooled {_fmt(m['macro_f1_pooled'])})",
        f"EMD {_fmt(m['emd']['mean'])} (expected {_fmt(m['emd_expected']['mean'])})",
        f"entropy {_fmt(m['entropy'])}",
        f"sigma {_fmt(m['sigma_inequity']['mean'])}",
    ]
    if zs is not None:
        parts.append(f"zero-shot acc {_fmt(zs, True)}")
    return "; ".join(parts) + f"\nwrote {os.path.join(out, 'predictions.tsv')} and {os.path.join(out, 'summary.json')}"


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="cuma eval")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
