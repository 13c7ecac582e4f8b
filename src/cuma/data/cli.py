"""``cuma data``: prepare data sets.

    cuma data wvb   --wvb DIR --out DIR --train-pairs N --test-pairs M [--valid-pairs K] --seed S
                    [--holdout-countries A,B | --holdout-fraction F] [--encoder NAME_OR_PATH | --no-embeddings]
                    [--question-ids Q1,Q2,...] [--overwrite]
    cuma data synth --out DIR --participants 5000 --questions 40 --modes 4 --seed 0 [--countries 10] [--overwrite]
                    [--prepare DIR --train-pairs N --test-pairs M ...]   (also write a prepared-data directory)
    cuma data prism --survey FILE --conversations FILE --out DIR [--seed 0] [--valid-fraction 0.1]
                    [--test-fraction 0.1] [--split-by conversation|user] [--supervise all|last] [--max-turns N]
                    [--encoder NAME_OR_PATH | --no-embeddings] [--overwrite]
    cuma data ca    --input FILE_OR_DIR --out DIR [same options]      (Community Alignment; also 4-way choice items)
    cuma data opinions --source SOURCE --input PATH --out DIR --split {question,group,cell} [...]  (docs/opinions.md)
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

__all__ = ["add_arguments", "run"]


def _pairs(value: str):
    from .splits import parse_pair_count

    try:
        return parse_pair_count(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _fraction(value: str) -> float:
    try:
        f = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {value!r}") from None
    if not 0.0 < f < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {value!r}")
    return f


def _nonneg_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value!r}")
    return n


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def _csv(value: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {value!r}")
    return items


def _add_prepare_options(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--train-pairs", type=_pairs, required=required, default=None if required else 20000,
                   help="(participant, question) pairs sampled from the train split ('all' for every pair)")
    p.add_argument("--test-pairs", type=_pairs, required=required, default=None if required else 5000,
                   help="pairs sampled from the test split ('all' for every pair)")
    p.add_argument("--valid-pairs", type=_pairs, default=0, help="pairs sampled from the valid split (default 0)")
    hold = p.add_mutually_exclusive_group()
    hold.add_argument("--holdout-countries", type=_csv, default=None, metavar="A,B",
                      help="hold these countries' profiles out of train/valid; test only on them (zero-shot)")
    hold.add_argument("--holdout-fraction", type=_fraction, default=None, metavar="F",
                      help="hold out a seeded fraction of the distinct profiles (zero-shot)")
    p.add_argument("--holdout-test-keeps-seen", action="store_true",
                   help="with a hold-out, keep the seen profiles' test pairs too (marked held_out: false)")
    enc = p.add_mutually_exclusive_group()
    enc.add_argument("--encoder", default="default", metavar="NAME_OR_PATH",
                     help="profile encoder for profile_embeds.safetensors (default: the embedded all-MiniLM-L6-v2)")
    enc.add_argument("--no-embeddings", action="store_true", help="do not write profile_embeds.safetensors")
    p.add_argument("--encoder-device", default="auto", metavar="DEVICE",
                   help="device for the profile encoder (default auto: cuda when available, else cpu)")
    p.add_argument("--question-ids", dest="question_ids", type=_csv, default=None, metavar="Q1,Q2",
                   help="keep only these value questions")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output directory")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="DATASET")
    sub.required = True

    w = sub.add_parser("wvb", help="prepare WorldValuesBench-format files (real or synthetic) for training/eval",
                       description="Sample (participant, question) pairs within WVB's participant splits and write "
                       "train/valid/test JSONL records, profiles.jsonl, profile_embeds.safetensors and manifest.json.")
    w.add_argument("--wvb", required=True, metavar="DIR",
                   help="WorldValuesBench checkout (with WorldValuesBench/ and dataset_construction/)")
    w.add_argument("--out", required=True, metavar="DIR", help="prepared-data directory to write")
    w.add_argument("--seed", type=_nonneg_int, default=0)
    _add_prepare_options(w, required=True)

    s = sub.add_parser("synth", help="generate a synthetic population in the WVB layout (with truth.json)",
                       description="Write WVB-layout TSVs and metadata from a latent mixture of cultural modes, plus "
                       "truth.json (true answer distributions and oracle figures).")
    s.add_argument("--out", required=True, metavar="DIR", help="folder for the WVB-layout files")
    s.add_argument("--participants", type=int, default=5000)
    s.add_argument("--questions", type=int, default=40)
    s.add_argument("--modes", type=int, default=4)
    s.add_argument("--countries", type=int, default=10)
    s.add_argument("--seed", type=_nonneg_int, default=0)
    s.add_argument("--country-set", choices=("zones", "invented"), default="zones",
                   help="real countries of the Inglehart-Welzel cultural zones (default) or invented names (no prior "
                   "a sentence encoder could use for unseen countries)")
    s.add_argument("--zones", default=None, metavar="Z1,Z2", help="comma-separated zone names (default: all eight)")
    s.add_argument("--profile-fields", default=None, metavar="COL1,COL2",
                   help="WVB demographic columns that carry values, e.g. B_COUNTRY,X003R,Q260,Q289 (default: all)")
    s.add_argument("--mode-layout", choices=("random", "map"), default="random",
                   help="where each mode peaks: at random places of the scale, or along the cultural map (zones only)")
    s.add_argument("--country-strength", type=float, default=None, help="logit bonus of a country's dominant mode")
    s.add_argument("--answer-width", type=float, default=None, help="scale of each mode's peak width (smaller: sharper)")
    s.add_argument("--answer-noise", type=float, default=None, help="share of uniform answers mixed into each mode")
    s.add_argument("--prepare", metavar="DIR", default=None,
                   help="also write a prepared-data directory from the generated files (as `cuma data wvb` would)")
    _add_prepare_options(s, required=False)
    s.add_argument("--export-opinions", metavar="DIR", default=None,
                   help="also export the population's true group distributions as GlobalOpinionQA CSV, distributional "
                   "JSON and an OpinionQA wave folder (docs/opinions.md), for `cuma data opinions`")

    pr = sub.add_parser("prism", help="prepare PRISM (survey + conversations) as SFT / preference-pair records",
                        description="Follow each PRISM conversation along its chosen replies and write SFT "
                        "conversations, per-turn preference pairs, profiles and a manifest (docs/preference.md).")
    pr.add_argument("--survey", required=True, metavar="FILE", help="survey: JSONL, parquet, CSV or a saved HF dataset")
    pr.add_argument("--conversations", required=True, metavar="FILE",
                    help="conversations: JSONL, parquet, CSV or a saved HF dataset")
    _add_preference_options(pr)

    ca = sub.add_parser("ca", help="prepare Community Alignment as SFT / pair / 4-way choice records",
                        description="Read Community Alignment rows (one per annotator x conversation) and write SFT "
                        "conversations, per-turn preference pairs, first-turn 4-way choice items, profiles and a "
                        "manifest (docs/preference.md; column names in cuma.data.community_alignment.CA_COLUMNS).")
    ca.add_argument("--input", required=True, metavar="FILE_OR_DIR", help="CSV, parquet, JSONL or a saved HF dataset")
    _add_preference_options(ca)

    from .opinions_cli import add_opinions_parser  # cuma data opinions: group-level answer distributions

    add_opinions_parser(sub)


def _add_preference_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="prepared preference folder to write")
    p.add_argument("--seed", type=_nonneg_int, default=0)
    p.add_argument("--valid-fraction", type=_fraction_or_zero, default=0.1, metavar="F",
                   help="share of split units (conversations or users) for valid (default 0.1)")
    p.add_argument("--test-fraction", type=_fraction_or_zero, default=0.1, metavar="F",
                   help="share of split units for test (default 0.1)")
    p.add_argument("--split-by", choices=("conversation", "user"), default="conversation",
                   help="split unit; no conversation ever appears in two splits (default conversation)")
    p.add_argument("--supervise", choices=("all", "last"), default="all",
                   help="which assistant turns of an SFT conversation carry the loss (default all)")
    p.add_argument("--max-turns", type=_positive_int, default=None, metavar="N",
                   help="keep at most N (>= 1) turns per conversation")
    enc = p.add_mutually_exclusive_group()
    enc.add_argument("--encoder", default="default", metavar="NAME_OR_PATH",
                     help="profile encoder for profile_embeds.safetensors (default: the embedded all-MiniLM-L6-v2)")
    enc.add_argument("--no-embeddings", action="store_true", help="do not write profile_embeds.safetensors")
    p.add_argument("--encoder-device", default="auto", metavar="DEVICE")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output directory")


def _fraction_or_zero(value: str) -> float:
    try:
        f = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {value!r}") from None
    if not 0.0 <= f < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {value!r}")
    return f


def _run_preference(args: argparse.Namespace, encoder: Optional[str], command: list[str]) -> int:
    common = dict(seed=args.seed, valid_fraction=args.valid_fraction, test_fraction=args.test_fraction,
                  split_by=args.split_by, supervise=args.supervise, max_turns=args.max_turns, encoder=encoder,
                  encoder_device=args.encoder_device, overwrite=args.overwrite, command=command)
    if args.data_command == "prism":
        from .prism import prepare_prism

        manifest = prepare_prism(args.survey, args.conversations, args.out, **common)
    else:
        from .community_alignment import prepare_community_alignment

        manifest = prepare_community_alignment(args.input, args.out, **common)
    c = manifest["counts"]
    line = f"wrote {args.out}: conversations {c['sft']}, pairs {c['pairs']}"
    if c.get("choice") is not None:
        line += f", choice {c['choice']}"
    print(line + f", {c['profiles']} profiles")
    print(f"dropped: {json.dumps(manifest['dropped'])}")
    return 0


def _prepare(args: argparse.Namespace, source: str, out: str, encoder: Optional[str], command: list[str]) -> dict:
    """``prepare_wvb`` of the WVB-layout folder ``source`` into ``out`` with the prepare options of ``args``."""
    from .splits import prepare_wvb

    return prepare_wvb(
        source,
        out,
        train_pairs=args.train_pairs,
        test_pairs=args.test_pairs,
        valid_pairs=args.valid_pairs,
        seed=args.seed,
        holdout_countries=args.holdout_countries,
        holdout_fraction=args.holdout_fraction,
        holdout_test_keeps_seen=args.holdout_test_keeps_seen,
        encoder=encoder,
        encoder_device=args.encoder_device,
        question_ids=args.question_ids,
        overwrite=args.overwrite,
        command=command,
    )


def run(args: argparse.Namespace) -> int:
    from .synthetic import SynthConfig, write_synthetic

    command = ["cuma", "data"] + (sys.argv[2:] if len(sys.argv) > 2 and sys.argv[1] == "data" else [])
    encoder: Optional[str] = None if args.no_embeddings else args.encoder
    if args.data_command == "wvb":
        manifest = _prepare(args, args.wvb, args.out, encoder, command)
        c = manifest["counts"]
        print(
            f"wrote {args.out}: records {c['records']}, {c['profiles']} profiles, "
            f"{c['held_out_profiles']} held-out profiles; dropped answers {manifest['dropped']['answers']}"
        )
        if manifest.get("oracle_test"):
            print(f"oracle on the written test records: {json.dumps(manifest['oracle_test'])}")
        return 0
    if args.data_command == "opinions":
        from .opinions_cli import run_opinions

        return run_opinions(args, command)
    if args.data_command in ("prism", "ca"):
        return _run_preference(args, encoder, command)
    if args.data_command == "synth":
        config = SynthConfig(
            participants=args.participants,
            questions=args.questions,
            modes=args.modes,
            seed=args.seed,
            countries=args.countries,
            country_set=args.country_set,
            zones=tuple(z.strip() for z in args.zones.split(",") if z.strip()) if args.zones else (),
            profile_fields=tuple(f.strip() for f in args.profile_fields.split(",") if f.strip())
            if args.profile_fields else (),
            mode_layout=args.mode_layout,
            **{k: getattr(args, k) for k in ("country_strength", "answer_width", "answer_noise")
               if getattr(args, k) is not None},
        )
        manifest = write_synthetic(args.out, config, overwrite=args.overwrite)
        c = manifest["counts"]
        print(
            f"wrote {args.out}: {c['participants']['full']} participants ({c['participants']['train']}/"
            f"{c['participants']['valid']}/{c['participants']['test']}), {c['questions']} questions, "
            f"{c['distinct_profiles']} distinct profiles"
        )
        print(f"oracle (test split): {json.dumps(manifest['oracle']['test'])}")
        if args.prepare:
            prep = _prepare(args, args.out, args.prepare, encoder, command)
            print(f"wrote {args.prepare}: records {prep['counts']['records']}, {prep['counts']['profiles']} profiles")
        if args.export_opinions:
            from .opinions_export import export_synthetic_opinions

            exp = export_synthetic_opinions(args.out, args.export_opinions, seed=args.seed, overwrite=args.overwrite)
            print(f"wrote {args.export_opinions}: {exp['counts']['questions']} questions, {exp['counts']['countries']} "
                  "countries as globalopinionqa.csv, opinions.json, opinionqa/ and truth_groups.json")
        return 0
    raise ValueError(f"unknown data command {args.data_command!r}; expected 'wvb', 'synth', 'prism' or 'ca'")
