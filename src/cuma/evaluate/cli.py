"""``cuma eval wvb``: score a model / adapter on prepared WVB-format data and write predictions.tsv + summary.json.

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
import json
import os
import sys
import time
from typing import Any, Optional

__all__ = ["add_arguments", "run", "run_wvb", "read_records", "validate_records"]

REQUIRED_FIELDS = (
    "question_id",
    "letters",
    "options",
    "option_values",
    "gold_letter",
    "gold_value",
    "scale_min",
    "scale_max",
    "question",
)


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


def run(args: argparse.Namespace) -> int:
    return int(args._eval_run(args) or 0)


# ----------------------------------------------------------------------------------------------- data


def read_records(path: str) -> list[dict]:
    """Records of one JSONL file (docs/data-schema.md); a missing file is a FileNotFoundError, a bad line a
    ValueError naming ``file:line``."""
    from ..data.records import read_jsonl

    return read_jsonl(path)


def validate_records(records: list[dict], need_profile_index: bool = False) -> tuple[list[dict], dict[str, int]]:
    """Keep the records that can be scored; returns ``(kept, {reason: count})``."""
    kept, dropped = [], {}

    def drop(reason: str) -> None:
        dropped[reason] = dropped.get(reason, 0) + 1

    for rec in records:
        missing = [k for k in REQUIRED_FIELDS if rec.get(k) is None]
        if missing:
            drop(f"missing field {missing[0]}")
            continue
        letters = rec["letters"]
        if not (len(letters) == len(rec["options"]) == len(rec["option_values"])):
            drop("letters, options and option_values differ in length")
            continue
        if len(letters) < 2:
            drop("fewer than two options")
            continue
        if rec["gold_letter"] not in letters:
            drop("gold_letter not among the letters")
            continue
        if rec["option_values"][letters.index(rec["gold_letter"])] != rec["gold_value"]:
            drop("gold_value is not the value of gold_letter")
            continue
        if need_profile_index and rec.get("profile_index") is None:
            drop("no profile_index (the method routes on profile_embeds)")
            continue
        kept.append(rec)
    return kept, dropped


# ----------------------------------------------------------------------------------------------- run


def _resolve_device(name: str):
    import torch

    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _files_sha(folder: Optional[str], names: tuple[str, ...]) -> dict[str, str]:
    from .report import sha256_file

    if not folder or not os.path.isdir(folder):
        return {}
    return {n: sha256_file(os.path.join(folder, n)) for n in names if os.path.isfile(os.path.join(folder, n))}


def _build_method(args, base):
    """(BuiltMethod, method name) for the requested method: built fresh for the prompting baselines, reloaded from
    ``--adapter`` for trained methods."""
    from .. import methods

    name = args.method
    if name is None:
        if not args.adapter:
            raise ValueError("pass --method (or --adapter with a cuma_method.json); methods: "
                             + ", ".join(methods.list_methods()))
        rec = methods.read_record(args.adapter)
        if not rec:
            raise ValueError(f"{args.adapter} has no {methods.METHOD_FILE}; pass --method")
        name = rec["method"]
    spec = methods.get_spec(name)
    if args.fewshot_k is not None and spec.prompt_mode != "fewshot":
        raise ValueError(f"--fewshot-k applies to --method fewshot only, not {name!r}")
    pip = args.profile_in_prompt
    if spec.prompting_only:
        if args.adapter:
            raise ValueError(f"method {name!r} is a prompting baseline and takes no --adapter")
        options: dict[str, Any] = {}
        if spec.prompt_mode == "vanilla" and pip:
            raise ValueError("vanilla prompts without the profile; use --method persona to put it in the prompt")
        if spec.prompt_mode == "persona" and pip is False:
            raise ValueError("persona always puts the profile in the prompt; use --method vanilla for no profile")
        if spec.prompt_mode == "fewshot":
            options["seed"] = args.seed
            if args.fewshot_k is not None:
                options["k"] = args.fewshot_k
            if pip is not None:
                options["profile_in_prompt"] = pip
        built = methods.build(name, base, **options)
    else:
        if not args.adapter:
            raise ValueError(
                f"method {name!r} is trained: pass --adapter DIR (the folder its training run saved); "
                "the prompting baselines vanilla, persona and fewshot need none"
            )
        if not os.path.isdir(args.adapter):
            raise FileNotFoundError(f"adapter folder {args.adapter} does not exist")
        built = methods.load(name, base, args.adapter)
    return built, name


def run_wvb(args: argparse.Namespace) -> int:
    """``cuma eval wvb``; ``--no-progress`` also silences the loading bars of transformers for the run."""
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
    from .choice import compute_metrics
    from .report import atomic_write_json, build_summary, write_predictions_tsv
    from .scoring import load_profile_table, score_records

    t0 = time.perf_counter()
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    data = args.data
    if not os.path.isdir(data):
        raise FileNotFoundError(f"data folder {data} does not exist; prepare it with cuma data wvb")
    split_path = os.path.join(data, f"{args.split}.jsonl")
    raw = read_records(split_path)
    data_files = [split_path]
    manifest_path = os.path.join(data, "manifest.json")
    manifest = None
    if os.path.isfile(manifest_path):
        with open(manifest_path, encoding="utf-8") as fh:
            manifest = json.load(fh)
        data_files.append(manifest_path)

    torch.manual_seed(args.seed)
    device = _resolve_device(args.device)
    try:
        base, tokenizer = models.load_base_and_tokenizer(args.model, dtype=args.dtype)
    except models.ModelLoadError as err:
        raise ValueError(str(err)) from err
    t_load = time.perf_counter()
    built, method = _build_method(args, base)
    model = built.model.to(device).eval()
    profile_in_prompt = built.profile_in_prompt if args.profile_in_prompt is None else bool(args.profile_in_prompt)

    records, dropped = validate_records(raw, need_profile_index=built.uses_profile)
    if args.limit is not None and len(records) > args.limit:
        dropped[f"beyond --limit {args.limit}"] = len(records) - args.limit
        records = records[: args.limit]
    if not records:
        raise ValueError(f"{split_path}: no records to score (dropped: {dropped or 'none'})")

    profile_table = None
    if built.uses_profile:
        emb_path = os.path.join(data, "profile_embeds.safetensors")
        if not os.path.isfile(emb_path):
            raise FileNotFoundError(f"method {method!r} routes on the profile but {emb_path} does not exist")
        profile_table = load_profile_table(emb_path)
        data_files.append(emb_path)
        if profile_table.shape[1] != built.profile_dim:
            raise ValueError(
                f"{emb_path} holds {profile_table.shape[1]}-d profile embeddings but the adapter was built with "
                f"profile_dim={built.profile_dim}; prepare the data with the encoder the adapter was trained with"
            )
    profiles_path = os.path.join(data, "profiles.jsonl")
    if os.path.isfile(profiles_path):
        data_files.append(profiles_path)

    fewshot_pool, fewshot_k, fewshot_key, fewshot_seed = None, 0, "country", args.seed
    if built.prompt_mode == "fewshot":
        fewshot_k = int(built.options["k"])
        fewshot_key = built.options.get("key") or "country"
        fewshot_seed = int(built.options.get("seed") or 0)
        train_path = os.path.join(data, "train.jsonl")
        fewshot_pool, _ = validate_records(read_records(train_path))
        data_files.append(train_path)

    t_score = time.perf_counter()
    preds = score_records(
        model,
        tokenizer,
        records,
        batch_size=args.batch_size,
        profile_table=profile_table,
        profile_in_prompt=profile_in_prompt,
        fewshot_pool=fewshot_pool,
        fewshot_k=fewshot_k,
        fewshot_seed=fewshot_seed,
        fewshot_key=fewshot_key,
        progress=not args.no_progress,
        desc=f"eval {method}",
    )
    t_done = time.perf_counter()
    metrics = compute_metrics(preds)

    counts = {
        "records_in_split": len(raw),
        "pairs": len(preds),
        "questions": len({p["question_id"] for p in preds}),
        "participants": len({p["participant_id"] for p in preds}),
        "profiles": len({r.get("profile_index") for r in records if r.get("profile_index") is not None}),
        "held_out_pairs": sum(1 for p in preds if p["held_out"]),
        "dropped": dropped,
        "dropped_total": sum(dropped.values()),
        "questions_without_emd": metrics["questions"] - metrics["emd"]["questions"],
    }
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
        "fewshot_k": fewshot_k,
        "fewshot_key": fewshot_key if fewshot_k else None,
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
        "score_s": round(t_done - t_score, 3),
        "pairs_per_s": round(len(preds) / max(t_done - t_score, 1e-9), 3),
        "total_s": round(time.perf_counter() - t0, 3),
    }
    summary = build_summary(
        metrics,
        counts=counts,
        config=config,
        data_files=data_files,
        seed=args.seed,
        model=model_info,
        method=built.record(),
        timing=timing,
        notes=notes,
    )
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
