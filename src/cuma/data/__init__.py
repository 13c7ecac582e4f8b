"""Data sets for CuMA: WorldValuesBench loading, the synthetic population, pair sampling / held-out profiles, the
prepared-data directory and the chat prompts. Record schema: ``docs/data-schema.md``; commands: ``docs/data.md``."""

from __future__ import annotations

from .prompts import answer_text, letter_token_ids, render_messages, render_prompt
from .records import (
    LETTERS,
    RECORD_FIELDS,
    PreparedData,
    load_prepared,
    make_record,
    read_jsonl,
    validate_record,
    write_jsonl,
)
from .splits import HoldoutSpec, build_records, heldout_profiles, prepare_wvb, sample_pairs, select_pairs
from .synthetic import SynthConfig, generate, load_truth, oracle_metrics, wasserstein_1d, write_synthetic
from .wvb import Question, WVBData, adjusted_options, clean_question_text, find_wvb_paths, load_wvb

__all__ = [
    "LETTERS",
    "RECORD_FIELDS",
    "HoldoutSpec",
    "PreparedData",
    "Question",
    "SynthConfig",
    "WVBData",
    "adjusted_options",
    "answer_text",
    "build_records",
    "clean_question_text",
    "find_wvb_paths",
    "generate",
    "heldout_profiles",
    "letter_token_ids",
    "load_prepared",
    "load_truth",
    "load_wvb",
    "make_record",
    "oracle_metrics",
    "prepare_wvb",
    "read_jsonl",
    "render_messages",
    "render_prompt",
    "sample_pairs",
    "select_pairs",
    "validate_record",
    "wasserstein_1d",
    "write_jsonl",
    "write_synthetic",
]
