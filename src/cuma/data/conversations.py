"""Shared logic of the preference data sets (PRISM, Community Alignment): reading tables, conversations along the
chosen thread, SFT / pair / choice records, seeded splits by conversation (or user), and the writer of the prepared
preference folder (``docs/preference-schema.md``).

A dataset loader turns its raw rows into :class:`Conversation` objects (one per conversation x user, each turn with
its user message, its candidate responses and the index of the chosen / preferred one) and counts what it drops in a
:class:`Dropped`. :func:`prepare_preference` then splits, builds the records and writes the folder atomically.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from ..profiles import Profile
from ..runinfo import atomic_directory, atomic_write_json, not_utf8_error, package_versions, read_text, sha256_file
from .records import EMBEDS_FILE, EMBEDS_KEY, SPLITS, write_jsonl

__all__ = [
    "PREFERENCE_FORMAT",
    "PREFERENCE_SYSTEM_PROMPT",
    "Conversation",
    "Dropped",
    "Turn",
    "assign_splits",
    "build_choice_records",
    "build_pair_records",
    "build_sft_record",
    "load_table",
    "prepare_preference",
    "prompt_messages",
    "read_preference_split",
]

PathLike = Union[str, os.PathLike]
PREFERENCE_FORMAT = "cuma-prepared-preference"
PREFERENCE_VERSION = 1
PREFERENCE_SYSTEM_PROMPT = "You are a helpful assistant."
PROFILE_PREFIX = "About the user: "
_VERSIONED = ("cuma", "numpy", "pandas", "pyarrow", "datasets", "torch", "transformers", "safetensors")


# ---------------------------------------------------------------------------------------------------------- reading


def _clean_value(value: Any) -> Any:
    """numpy arrays/scalars -> lists/Python scalars, float NaN -> None (recursively)."""
    if isinstance(value, dict):
        return {k: _clean_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean_value(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_clean_value(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    if type(value).__name__ in ("NAType", "NaTType"):
        return None
    return value


def load_table(path: PathLike) -> list[dict[str, Any]]:
    """Rows of a JSONL / JSON / CSV / parquet file, or of a Hugging Face dataset saved with ``save_to_disk`` (a
    ``DatasetDict`` gives the rows of all its splits), or of a folder of parquet / JSONL / CSV files."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"input {str(p)!r} does not exist")
    if p.is_dir():
        if (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
            from datasets import Dataset, DatasetDict, load_from_disk

            ds = load_from_disk(str(p))
            parts = list(ds.values()) if isinstance(ds, DatasetDict) else [ds]
            rows: list[dict] = []
            for part in parts:
                assert isinstance(part, Dataset)
                rows.extend(_clean_value(dict(r)) for r in part)
            return rows
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in (".parquet", ".jsonl", ".json", ".csv"))
        if not files:
            raise ValueError(f"{p}: not a saved Hugging Face dataset and holds no .parquet/.jsonl/.json/.csv files")
        rows = []
        for f in files:
            rows.extend(load_table(f))
        return rows
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        from .records import read_jsonl

        return read_jsonl(p)  # not UTF-8, bad JSON, not an object: ValueError naming file:line
    if suffix == ".json":
        text = read_text(p)
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{p}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
        if isinstance(value, dict):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise ValueError(f"{p}: expected a JSON list of objects")
        return value
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return [_clean_value(r) for r in pq.read_table(str(p)).to_pylist()]
    if suffix in (".csv", ".tsv"):
        import pandas as pd

        try:
            frame = pd.read_csv(p, sep="\t" if suffix == ".tsv" else ",", dtype=object, keep_default_na=True)
        except UnicodeDecodeError:
            raise not_utf8_error(p) from None
        except pd.errors.EmptyDataError:
            raise ValueError(f"{p}: the file is empty; expected a header row and one row per record") from None
        except pd.errors.ParserError as err:
            raise ValueError(f"{p}: not a {'tab' if suffix == '.tsv' else 'comma'}-separated table ({err})") from None
        return [_clean_value(r) for r in frame.to_dict(orient="records")]
    raise ValueError(f"{p}: unsupported input format {suffix!r}; use .jsonl, .json, .csv, .parquet or a saved dataset")


def maybe_json(value: Any) -> Any:
    """A JSON string (as nested columns come out of CSV) parsed; anything else unchanged."""
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def text_of(value: Any) -> Optional[str]:
    """Stripped text, or None for missing / empty values."""
    value = _clean_value(value)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def check_max_turns(max_turns: Any) -> Optional[int]:
    """``max_turns`` (``--max-turns``): None (keep every turn) or an integer >= 1; anything else is a ValueError (0
    would keep conversations without messages, a negative value would cut each conversation's last turns)."""
    if max_turns is None:
        return None
    if isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 1:
        raise ValueError(f"--max-turns: expected a positive integer (turns kept per conversation), got {max_turns!r}")
    return max_turns


def require_columns(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], what: str) -> None:
    """ValueError naming the columns that no row has (empty tables are an error too)."""
    if not rows:
        raise ValueError(f"{what}: no rows")
    present: set[str] = set()
    for r in rows[:1000]:
        present.update(r.keys())
    missing = [c for c in columns if c not in present]
    if missing:
        raise ValueError(f"{what}: missing required columns {missing}; found {sorted(present)}")


# ---------------------------------------------------------------------------------------------------------- model


class Dropped:
    """Counts of dropped items by reason, per level (``conversations``, ``turns``, ``pairs``, ``rows``, ...)."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter] = {}

    def add(self, level: str, reason: str, n: int = 1) -> None:
        self.counts.setdefault(level, Counter())[reason] += n

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {level: dict(sorted(c.items())) for level, c in sorted(self.counts.items())}

    def total(self, level: str) -> int:
        return sum(self.counts.get(level, Counter()).values())


@dataclass
class Turn:
    """One turn: the user's message, the candidate responses, and which one was chosen / preferred."""

    user: str
    responses: list[str]
    chosen: int
    meta: list[dict] = field(default_factory=list)  # per response (model name, score, ...), optional

    @property
    def chosen_text(self) -> str:
        return self.responses[self.chosen]


@dataclass
class Conversation:
    """A conversation along the chosen thread, as seen by one user / annotator."""

    conversation_id: str
    user_id: str
    profile: Profile
    turns: list[Turn]
    meta: dict = field(default_factory=dict)

    @property
    def record_id(self) -> str:
        return self.conversation_id if not self.meta.get("id_with_user") else f"{self.conversation_id}:{self.user_id}"


# ---------------------------------------------------------------------------------------------------------- splits


def _counts(n: int, valid_fraction: float, test_fraction: float) -> tuple[int, int]:
    def one(frac: float) -> int:
        if frac <= 0:
            return 0
        return max(1, int(round(frac * n))) if n >= 3 else int(round(frac * n))

    n_test, n_valid = one(test_fraction), one(valid_fraction)
    if n_test + n_valid >= n and n > 0:
        raise ValueError(
            f"{n} split units cannot give {n_valid} valid and {n_test} test units and leave any for training"
        )
    return n_valid, n_test


def assign_splits(keys: Sequence[str], valid_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """Seeded assignment of unique keys to ``train`` / ``valid`` / ``test`` (sorted, then permuted)."""
    for name, frac in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= float(frac) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {frac!r}")
    uniq = sorted(set(keys))
    n_valid, n_test = _counts(len(uniq), valid_fraction, test_fraction)
    order = np.random.default_rng([int(seed), 17]).permutation(len(uniq))
    out: dict[str, str] = {}
    for rank, i in enumerate(order.tolist()):
        out[uniq[i]] = "test" if rank < n_test else "valid" if rank < n_test + n_valid else "train"
    return out


def split_conversations(
    convs: Sequence[Conversation], *, by: str, valid_fraction: float, test_fraction: float, seed: int, dropped: Dropped
) -> dict[str, list[Conversation]]:
    """Split by conversation id (``by="conversation"``) or by user (``by="user"``). By user, a conversation seen by
    users of different splits goes to the split of its first user (sorted) and the other users' copies are dropped
    (counted), so that neither a user nor a conversation appears in two splits."""
    if by not in ("conversation", "user"):
        raise ValueError(f"split by 'conversation' or 'user', not {by!r}")
    out: dict[str, list[Conversation]] = {s: [] for s in SPLITS}
    if by == "conversation":
        table = assign_splits([c.conversation_id for c in convs], valid_fraction, test_fraction, seed)
        for c in convs:
            out[table[c.conversation_id]].append(c)
        return out
    table = assign_splits([c.user_id for c in convs], valid_fraction, test_fraction, seed)
    owner: dict[str, str] = {}
    for c in sorted(convs, key=lambda c: (c.conversation_id, c.user_id)):
        owner.setdefault(c.conversation_id, table[c.user_id])
    for c in convs:
        split = table[c.user_id]
        if owner[c.conversation_id] != split:
            dropped.add("conversations", "conversation shared with a user of another split (split by user)")
            continue
        out[split].append(c)
    return out


# ---------------------------------------------------------------------------------------------------------- records


def prompt_messages(record: Mapping[str, Any], profile_in_prompt: bool = True,
                    system_prompt: str = PREFERENCE_SYSTEM_PROMPT) -> list[dict[str, str]]:
    """A pair / choice record's ``prompt`` with a system message in front (profile sentence appended when asked)."""
    system = system_prompt
    profile = str(record.get("profile_text") or "").strip() if profile_in_prompt else ""
    if profile:
        system = f"{system}\n{PROFILE_PREFIX}{profile}"
    return [{"role": "system", "content": system}] + [dict(m) for m in record["prompt"]]


def _base(conv: Conversation, split: str, profile_text: str, profile_index: int) -> dict[str, Any]:
    return {
        "conversation_id": conv.conversation_id,
        "user_id": conv.user_id,
        "split": split,
        "profile": conv.profile.to_dict(),
        "profile_text": profile_text,
        "profile_index": profile_index,
    }


def build_sft_record(conv: Conversation, split: str, profile_index: int, supervise: str = "all") -> dict[str, Any]:
    if supervise not in ("all", "last"):
        raise ValueError(f"supervise must be 'all' or 'last', got {supervise!r}")
    messages = []
    for t in conv.turns:
        messages.append({"role": "user", "content": t.user})
        messages.append({"role": "assistant", "content": t.chosen_text})
    rec = {"id": conv.record_id}
    rec.update(_base(conv, split, conv.profile.to_text(), profile_index))
    rec["messages"] = messages
    rec["supervise"] = supervise
    return rec


def build_pair_records(conv: Conversation, split: str, profile_index: int, dropped: Dropped) -> list[dict[str, Any]]:
    """One record per turn x rejected response; the prompt is the shared history ending with the user's turn."""
    out = []
    history: list[dict[str, str]] = []
    for ti, t in enumerate(conv.turns):
        history.append({"role": "user", "content": t.user})
        for ri, resp in enumerate(t.responses):
            if ri == t.chosen:
                continue
            if not resp:
                dropped.add("pairs", "empty rejected response")
                continue
            if resp.strip() == t.chosen_text.strip():
                dropped.add("pairs", "rejected response identical to the chosen one")
                continue
            rec = {"id": f"{conv.record_id}:t{ti}:r{ri}"}
            rec.update(_base(conv, split, conv.profile.to_text(), profile_index))
            rec["turn"] = ti
            rec["prompt"] = [dict(m) for m in history]
            rec["chosen"] = t.chosen_text
            rec["rejected"] = resp
            out.append(rec)
        history.append({"role": "assistant", "content": t.chosen_text})
    return out


def build_choice_records(conv: Conversation, split: str, profile_index: int, letters: Sequence[str],
                         dropped: Dropped) -> list[dict[str, Any]]:
    """The first turn as a choice item (needs exactly ``len(letters)`` non-empty responses)."""
    t = conv.turns[0]
    if len(t.responses) != len(letters) or not all(t.responses):
        dropped.add("choice", f"first turn does not have {len(letters)} non-empty responses")
        return []
    rec = {"id": f"{conv.conversation_id}:{conv.user_id}"}
    rec.update(_base(conv, split, conv.profile.to_text(), profile_index))
    rec["prompt"] = [{"role": "user", "content": t.user}]
    rec["letters"] = list(letters)
    rec["options"] = list(t.responses)
    rec["gold_letter"] = letters[t.chosen]
    return [rec]


def read_preference_split(folder: PathLike, kind: str, split: str) -> list[dict[str, Any]]:
    """Records of ``DIR/{kind}_{split}.jsonl`` (kind: sft, pairs, choice)."""
    from .records import read_jsonl

    if kind not in ("sft", "pairs", "choice"):
        raise ValueError(f"kind must be sft, pairs or choice, got {kind!r}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    return read_jsonl(Path(folder) / f"{kind}_{split}.jsonl")


# ---------------------------------------------------------------------------------------------------------- writing


def prepare_preference(
    conversations: Sequence[Conversation],
    out: PathLike,
    *,
    dataset: str,
    dropped: Dropped,
    seed: int = 0,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
    split_by: str = "conversation",
    supervise: str = "all",
    choice_letters: Optional[Sequence[str]] = None,
    encoder: Any = None,
    encoder_device: Optional[str] = "auto",
    overwrite: bool = False,
    inputs: Optional[Mapping[str, PathLike]] = None,
    options: Optional[Mapping[str, Any]] = None,
    command: Optional[Sequence[str]] = None,
    source_counts: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """Split ``conversations``, build SFT / pair (/ choice) records and write the prepared folder atomically.
    Returns the manifest."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if supervise not in ("all", "last"):
        raise ValueError(f"supervise must be 'all' or 'last', got {supervise!r}")
    if not conversations:
        raise ValueError(f"{dataset}: no usable conversations left (dropped: {dropped.to_dict()})")
    ids = Counter((c.conversation_id, c.user_id) for c in conversations)
    dup = [k for k, n in ids.items() if n > 1]
    if dup:
        raise ValueError(f"{dataset}: {len(dup)} (conversation, user) pairs occur more than once, e.g. {dup[0]}")
    parts = split_conversations(conversations, by=split_by, valid_fraction=valid_fraction,
                                test_fraction=test_fraction, seed=seed, dropped=dropped)
    texts: dict[str, Profile] = {}
    for split in SPLITS:
        for c in parts[split]:
            texts.setdefault(c.profile.to_text(), c.profile)
    ordered = sorted(texts)
    index = {t: i for i, t in enumerate(ordered)}
    profiles = [{"profile_index": i, "profile_text": t, "profile": texts[t].to_dict()} for i, t in enumerate(ordered)]

    sft: dict[str, list] = {}
    pairs: dict[str, list] = {}
    choice: dict[str, list] = {}
    for split in SPLITS:
        sft[split], pairs[split], choice[split] = [], [], []
        for c in sorted(parts[split], key=lambda c: (c.conversation_id, c.user_id)):
            pi = index[c.profile.to_text()]
            sft[split].append(build_sft_record(c, split, pi, supervise))
            pairs[split].extend(build_pair_records(c, split, pi, dropped))
            if choice_letters is not None:
                choice[split].extend(build_choice_records(c, split, pi, choice_letters, dropped))
    # the guarantee, checked on what is written
    seen: dict[str, str] = {}
    for split in SPLITS:
        for rec in sft[split]:
            other = seen.setdefault(rec["conversation_id"], split)
            if other != split:
                raise AssertionError(f"conversation {rec['conversation_id']} in both {other} and {split}")

    from ..encoder import resolve_encoder

    enc = resolve_encoder(encoder, encoder_device)
    embeds = None
    if enc is not None and profiles:
        import torch

        embeds = enc.encode([p["profile_text"] for p in profiles]).detach().to("cpu", torch.float32).contiguous()
        if tuple(embeds.shape) != (len(profiles), enc.dim):
            raise RuntimeError(f"encoder returned {tuple(embeds.shape)}, expected ({len(profiles)}, {enc.dim})")

    source = {}
    for name, path in (inputs or {}).items():
        p = Path(path)
        if p.is_file():
            source[name] = {"path": str(p.resolve()), "sha256": sha256_file(p)}
        elif p.is_dir():
            source[name] = {
                "path": str(p.resolve()),
                "sha256": {f.name: sha256_file(f) for f in sorted(p.iterdir()) if f.is_file()},
            }
    with atomic_directory(out, overwrite=overwrite) as tmp:
        for split in SPLITS:
            write_jsonl(tmp / f"sft_{split}.jsonl", sft[split])
            write_jsonl(tmp / f"pairs_{split}.jsonl", pairs[split])
            if choice_letters is not None:
                write_jsonl(tmp / f"choice_{split}.jsonl", choice[split])
        write_jsonl(tmp / "profiles.jsonl", profiles)
        embeddings_info = None
        if embeds is not None:
            from safetensors.torch import save_file

            save_file({EMBEDS_KEY: embeds}, str(tmp / EMBEDS_FILE),
                      metadata={"encoder": str(getattr(enc, "source", "")), "dim": str(enc.dim),
                                "profiles": "profiles.jsonl"})
            embeddings_info = {"file": EMBEDS_FILE, "key": EMBEDS_KEY, "shape": list(embeds.shape), "dtype": "float32"}
        manifest = {
            "format": PREFERENCE_FORMAT,
            "format_version": PREFERENCE_VERSION,
            "dataset": dataset,
            "command": list(command) if command is not None else None,
            "options": {
                **dict(options or {}),
                "seed": seed,
                "valid_fraction": valid_fraction,
                "test_fraction": test_fraction,
                "split_by": split_by,
                "supervise": supervise,
                "encoder": encoder if isinstance(encoder, str) or encoder is None else getattr(enc, "source", None),
            },
            "seed": seed,
            "split": {"by": split_by, "valid_fraction": valid_fraction, "test_fraction": test_fraction,
                      "seed": seed, "method": "sorted unique keys, numpy default_rng([seed, 17]) permutation"},
            "source": {"files": source, "counts": dict(source_counts or {})},
            "counts": {
                "conversations": {s: len(sft[s]) for s in SPLITS},
                "unique_conversation_ids": {s: len({r["conversation_id"] for r in sft[s]}) for s in SPLITS},
                "users": {s: len({r["user_id"] for r in sft[s]}) for s in SPLITS},
                "sft": {s: len(sft[s]) for s in SPLITS},
                "pairs": {s: len(pairs[s]) for s in SPLITS},
                "choice": {s: len(choice[s]) for s in SPLITS} if choice_letters is not None else None,
                "profiles": len(profiles),
                "assistant_turns": {s: sum(len(r["messages"]) // 2 for r in sft[s]) for s in SPLITS},
            },
            "dropped": dropped.to_dict(),
            "encoder": None if enc is None else (enc.describe() if hasattr(enc, "describe") else {"dim": enc.dim}),
            "embeddings": embeddings_info,
            "outputs": {},
            "versions": package_versions(_VERSIONED, python=True),
        }
        manifest["outputs"] = {
            p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.name != "manifest.json"
        }
        atomic_write_json(tmp / "manifest.json", manifest)
    return manifest


_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_OPEN_THINK = re.compile(r"<think>.*\Z", re.DOTALL | re.IGNORECASE)


def strip_think(text: str) -> str:
    """Remove ``<think>...</think>`` blocks (and an unclosed trailing ``<think>...``) and surrounding space."""
    text = _THINK.sub("", text or "")
    text = _OPEN_THINK.sub("", text)
    text = re.sub(r"^\s*</think>", "", text)
    return text.strip()
