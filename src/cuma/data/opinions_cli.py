"""``cuma data opinions``: read an opinion-distribution source and write a prepared opinions folder.

    cuma data opinions --source {globalopinionqa,opinions-json,opinionqa,wvb} --input PATH --out DIR
                       --split {question,group,cell} [--holdout-groups NAMES_OR_FILE] [--test-fraction F]
                       [--valid-fraction F] [--group-fields FIELDS] [--min-group-size N] [--merge-groups FILE|builtin]
                       [--seed S] [--encoder NAME_OR_PATH | --no-embeddings] [--overwrite]

The layouts, splits and the folder's files: :mod:`cuma.data.opinions`, :mod:`cuma.data.opinion_readers`,
``docs/opinions.md``.
"""

from __future__ import annotations

import argparse
import json
from typing import Optional, Sequence

from .opinions import SOURCES, SPLIT_MODES, SUM_TOLERANCE

__all__ = ["add_opinions_parser", "run_opinions"]


def _fraction(value: str) -> float:
    try:
        f = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {value!r}") from None
    if not 0.0 <= f < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {value!r}")
    return f


def _int(minimum: int):
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value!r}") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value!r}")
        return n

    return parse


def add_opinions_parser(sub) -> argparse.ArgumentParser:
    """Add the ``opinions`` subcommand to ``cuma data``'s subparsers."""
    p = sub.add_parser(
        "opinions", help="prepare group-level opinion distributions (GlobalOpinionQA, OpinionQA, grouped WVB)",
        description="Read one (group, question) answer distribution per cell from a published layout and write "
        "cells_{train,valid,test}.jsonl, groups.jsonl, profile_embeds.safetensors and manifest.json "
        f"(docs/opinions.md). Targets off 1 by at most {SUM_TOLERANCE} are renormalised; larger gaps are skipped and "
        "counted in the manifest.")
    p.add_argument("--source", required=True, choices=SOURCES, help="layout of --input")
    p.add_argument("--input", required=True, metavar="PATH",
                   help="GlobalOpinionQA CSV, distributional JSON, an American_Trends_Panel_W<wave>/ folder (or a "
                   "folder of them), or a WVB-layout folder (real or `cuma data synth`)")
    p.add_argument("--out", required=True, metavar="DIR", help="prepared opinions folder to write")
    p.add_argument("--split", required=True, choices=SPLIT_MODES,
                   help="question: held-out questions; group: whole groups held out (zero-shot); cell: random "
                   "(group, question) cells held out")
    p.add_argument("--holdout-groups", default=None, metavar="NAMES_OR_FILE",
                   help="with --split group: the test groups, a comma list or a file with one name per line (for "
                   "names with commas); matched like profile values (case, spaces, trailing period)")
    p.add_argument("--test-fraction", type=_fraction, default=0.2, metavar="F",
                   help="share of questions / groups / cells held out for test (default 0.2; groups: used when "
                   "--holdout-groups is not given)")
    p.add_argument("--valid-fraction", type=_fraction, default=0.1, metavar="F",
                   help="share of questions / groups / cells held out for valid (default 0.1)")
    p.add_argument("--group-fields", default=None, metavar="FIELDS",
                   help="wvb: profile fields to group respondents by (default country); opinionqa: attributes (default "
                   "all of CREGION,AGE,...,RACE present); globalopinionqa / opinions-json: the one profile field the "
                   "group name goes into (default country)")
    p.add_argument("--min-group-size", type=_int(1), default=1, metavar="N",
                   help="wvb / opinionqa: skip (and count) cells with fewer respondents (default 1)")
    p.add_argument("--merge-groups", default=None, metavar="FILE|builtin",
                   help="globalopinionqa / opinions-json: merge group names (JSON object or 'name<TAB>canonical' lines; "
                   "'builtin': known spelling variants such as Britain / Great Britain); off by default")
    p.add_argument("--seed", type=_int(0), default=0)
    enc = p.add_mutually_exclusive_group()
    enc.add_argument("--encoder", default="default", metavar="NAME_OR_PATH",
                     help="profile encoder for profile_embeds.safetensors (default: the embedded all-MiniLM-L6-v2)")
    enc.add_argument("--no-embeddings", action="store_true", help="do not write profile_embeds.safetensors")
    p.add_argument("--encoder-device", default="auto", metavar="DEVICE")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output directory")
    return p


def run_opinions(args: argparse.Namespace, command: Optional[Sequence[str]] = None) -> int:
    from .opinion_readers import prepare_opinions

    fields = [f.strip() for f in args.group_fields.split(",") if f.strip()] if args.group_fields else None
    manifest = prepare_opinions(
        args.source, args.input, args.out, split=args.split, seed=args.seed, test_fraction=args.test_fraction,
        valid_fraction=args.valid_fraction, holdout_groups=args.holdout_groups, group_fields=fields,
        min_group_size=args.min_group_size, merge_groups=args.merge_groups,
        encoder=None if args.no_embeddings else args.encoder, encoder_device=args.encoder_device,
        overwrite=args.overwrite, command=command)
    c = manifest["counts"]
    print(f"wrote {args.out}: cells {json.dumps(c['cells'])}, {c['groups']} groups ({c['heldout_groups']} held out), "
          f"questions {json.dumps(c['questions'])}")
    print(f"skipped: {json.dumps(manifest['skipped'])}")
    return 0
