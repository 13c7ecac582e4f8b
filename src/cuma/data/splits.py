"""(participant, question) pair sampling within WVB's participant splits, held-out profiles, and the writer of the
prepared-data directory (``cuma data wvb``).

Sampling: within each participant split (WVB's own 70/15/15 ``train``/``valid``/``test``), ``N`` pairs are drawn
uniformly without replacement from the available (non-missing) pairs, each split from its own seeded stream
(``numpy.random.default_rng([seed, k])``), so changing ``--test-pairs`` never changes the training pairs.

Held-out profiles (zero-shot): ``holdout_countries`` holds out every profile of those countries;
``holdout_fraction`` a seeded fraction of the distinct profile texts (over all three splits, sorted, then
permuted). Participants with a held-out profile are removed from ``train`` and ``valid`` entirely, and ``test`` is
restricted to them; their records carry ``held_out: true``. Both removals are counted in the manifest. With
``held_out_pairs={"test": M}`` (or ``"valid"``) that split is stratified instead: its own count of pairs from
seen profiles plus M pairs from held-out profiles, so zero-shot accuracy has enough pairs (and the valid split can
measure it without touching the test split).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from ..runinfo import atomic_directory, atomic_write_json, package_versions, sha256_file
from .records import EMBEDS_FILE, EMBEDS_KEY, SPLITS, write_jsonl
from .wvb import WVBData, load_wvb

__all__ = [
    "ALL",
    "HoldoutSpec",
    "PairSelection",
    "build_records",
    "heldout_profiles",
    "parse_pair_count",
    "prepare_wvb",
    "sample_pairs",
    "select_pairs",
]

PathLike = Union[str, os.PathLike]
ALL = -1  # pair count meaning "every available pair"
_STREAM = {"holdout": 10, "train": 11, "valid": 12, "test": 13}
PREPARED_FORMAT = "cuma-prepared-wvb"
PREPARED_VERSION = 1
# distributions whose versions a prepared-data manifest records (after Python's)
_VERSIONED = ("cuma", "numpy", "pandas", "torch", "transformers", "safetensors")


def parse_pair_count(value: Any, name: str = "pairs") -> int:
    """``"all"`` / ``-1`` -> :data:`ALL`; a non-negative integer otherwise (``ValueError`` naming ``name``)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "all":
            return ALL
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"{name} must be a non-negative integer or 'all', got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < ALL:
        raise ValueError(f"{name} must be a non-negative integer or 'all', got {value!r}")
    return int(value)


@dataclass(frozen=True)
class HoldoutSpec:
    """Which profiles are held out of training (zero-shot). Empty: none."""

    countries: tuple[str, ...] = ()
    fraction: float = 0.0
    # the test split normally holds only the held-out profiles (the paper's zero-shot protocol); with this on it also
    # keeps the seen profiles' test participants (held_out: false), so one prepared folder gives both accuracies
    test_keeps_seen: bool = False
    # (split, n): stratified splits (valid / test) that hold n pairs of held-out profiles beside the split's own
    # count of seen-profile pairs (so a zero-shot accuracy has enough pairs, and the valid split can measure it too)
    held_out_pairs: tuple = ()

    def __post_init__(self) -> None:
        pairs = dict(self.held_out_pairs.items() if isinstance(self.held_out_pairs, Mapping) else self.held_out_pairs)
        for split, n in pairs.items():
            if split not in ("valid", "test"):
                raise ValueError(f"held-out pairs can be asked for the valid and test splits, not {split!r}")
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
                raise ValueError(f"held-out {split} pairs must be a non-negative integer, got {n!r}")
        object.__setattr__(self, "held_out_pairs", tuple(sorted((k, int(v)) for k, v in pairs.items())))
        if self.countries and self.fraction:
            raise ValueError("hold out by countries or by fraction, not both")
        if not 0.0 <= float(self.fraction) < 1.0:
            raise ValueError(f"holdout fraction must be in [0, 1), got {self.fraction!r}")
        clean = tuple(dict.fromkeys(" ".join(str(c).split()) for c in self.countries if str(c).strip()))
        object.__setattr__(self, "countries", clean)
        if self.held_out_pairs and not self.active:
            raise ValueError("held-out pairs were asked for, but no profile is held out (give holdout countries)")

    @property
    def active(self) -> bool:
        return bool(self.countries) or self.fraction > 0

    def describe(self) -> dict[str, Any]:
        out = {
            "countries": list(self.countries),
            "fraction": float(self.fraction),
            "test_keeps_seen": bool(self.test_keeps_seen),
        }
        if self.held_out_pairs:
            out["held_out_pairs"] = dict(self.held_out_pairs)
        return out


def _all_profile_texts(data: WVBData) -> dict[str, Any]:
    """profile text -> Profile, over every loaded split."""
    out: dict[str, Any] = {}
    for part in data.splits.values():
        for prof in part.profiles:
            out.setdefault(prof.to_text(), prof)
    return out


def heldout_profiles(data: WVBData, spec: HoldoutSpec, seed: int) -> set[str]:
    """The held-out profile texts for ``spec`` (empty when inactive)."""
    if not spec.active:
        return set()
    profiles = _all_profile_texts(data)
    if spec.countries:
        known = sorted({p.country for p in profiles.values() if p.country})
        by_lower = {c.lower(): c for c in known}
        unknown = [c for c in spec.countries if c.lower() not in by_lower]
        if unknown:
            raise ValueError(
                f"--holdout-countries: {unknown} are not countries of the data (column B_COUNTRY); known: {known}"
            )
        wanted = {by_lower[c.lower()] for c in spec.countries}
        held = {t for t, p in profiles.items() if p.country in wanted}
    else:
        texts = sorted(profiles)
        k = int(round(spec.fraction * len(texts)))
        k = max(k, 1)
        rng = np.random.default_rng([seed, _STREAM["holdout"]])
        held = {texts[i] for i in rng.permutation(len(texts))[:k]}
    if len(held) == len(profiles):
        raise ValueError("the hold-out spec holds out every profile; nothing would be left to train on")
    return held


def sample_pairs(
    valid: np.ndarray, n: int, seed: int, stream: int, allowed_rows: Optional[np.ndarray] = None, name: str = "pairs"
) -> np.ndarray:
    """(k, 2) array of (row, column) drawn uniformly without replacement from the True cells of ``valid``.

    ``allowed_rows`` (bool per row) restricts the rows; ``n == ALL`` takes every available pair (in a seeded random
    order). Asking for more pairs than available raises ``ValueError``.
    """
    mask = valid if allowed_rows is None else (valid & allowed_rows[:, None])
    flat = np.flatnonzero(mask.ravel())
    rng = np.random.default_rng([seed, stream])
    if n == ALL:
        chosen = flat[rng.permutation(len(flat))]
    else:
        if n > len(flat):
            raise ValueError(
                f"{name}: asked for {n} pairs but only {len(flat)} (participant, question) pairs with an answer are "
                "available there; ask for fewer or pass 'all'"
            )
        chosen = flat[rng.choice(len(flat), size=n, replace=False)] if n else flat[:0]
    rows, cols = np.divmod(chosen, mask.shape[1])
    return np.stack([rows, cols], axis=1).astype(np.int64)


@dataclass
class PairSelection:
    """Sampled pairs per split plus the bookkeeping the manifest needs."""

    pairs: dict[str, np.ndarray]  # split -> (k, 2) (row, column)
    held_out: set[str]
    holdout: HoldoutSpec
    pairs_available: dict[str, int] = field(default_factory=dict)  # after the hold-out restriction
    participants_used: dict[str, int] = field(default_factory=dict)
    participants_removed: dict[str, dict[str, int]] = field(default_factory=dict)


def select_pairs(
    data: WVBData,
    *,
    train_pairs: int,
    test_pairs: int,
    valid_pairs: int = 0,
    seed: int = 0,
    holdout: Optional[HoldoutSpec] = None,
) -> PairSelection:
    """Sample the pairs of every split (see the module docstring)."""
    holdout = holdout or HoldoutSpec()
    counts = {
        "train": parse_pair_count(train_pairs, "--train-pairs"),
        "valid": parse_pair_count(valid_pairs, "--valid-pairs"),
        "test": parse_pair_count(test_pairs, "--test-pairs"),
    }
    held = heldout_profiles(data, holdout, seed)
    sel = PairSelection(pairs={}, held_out=held, holdout=holdout)
    for split in SPLITS:
        if split not in data.splits:
            if counts[split] not in (0,):
                raise ValueError(f"split {split!r} was not loaded")
            sel.pairs[split] = np.zeros((0, 2), dtype=np.int64)
            continue
        part = data.splits[split]
        is_held = np.array([p.to_text() in held for p in part.profiles], dtype=bool)
        stratified = dict(holdout.held_out_pairs)
        if holdout.active and split in stratified:
            # counts[split] pairs of seen profiles plus the asked number of held-out-profile pairs (own stream)
            sel.participants_removed[split] = {}
            sel.participants_used[split] = int(part.num_participants)
            sel.pairs_available[split] = int(part.valid.sum())
            seen = sample_pairs(part.valid, counts[split], seed, _STREAM[split], allowed_rows=~is_held,
                                name=f"--{split}-pairs ({split} split, seen profiles)")
            held_pairs = sample_pairs(part.valid, stratified[split], seed, _STREAM[split] + 100, allowed_rows=is_held,
                                      name=f"held-out {split} pairs ({split} split, held-out profiles)")
            sel.pairs[split] = np.concatenate([seen, held_pairs], axis=0)
            continue
        if holdout.active and split == "test" and holdout.test_keeps_seen:
            allowed = np.ones(part.num_participants, dtype=bool)
            sel.participants_removed[split] = {}
        elif holdout.active and split == "test":
            allowed = is_held
            sel.participants_removed[split] = {"profile_not_held_out": int((~is_held).sum())}
        elif holdout.active:
            allowed = ~is_held
            sel.participants_removed[split] = {"held_out_profile": int(is_held.sum())}
        else:
            allowed = np.ones(part.num_participants, dtype=bool)
            sel.participants_removed[split] = {}
        sel.pairs_available[split] = int((part.valid & allowed[:, None]).sum())
        sel.participants_used[split] = int(allowed.sum())
        sel.pairs[split] = sample_pairs(
            part.valid,
            counts[split],
            seed,
            _STREAM[split],
            allowed_rows=allowed,
            name=f"--{split}-pairs ({split} split)",
        )
    return sel


def build_records(data: WVBData, selection: PairSelection) -> tuple[dict[str, list[dict]], list[dict]]:
    """Schema records per split and the profile table (sorted by profile text; ``profile_index`` = row)."""
    texts: dict[str, Any] = {}
    for split, pairs in selection.pairs.items():
        part = data.splits.get(split)
        for row in np.unique(pairs[:, 0]) if len(pairs) else ():
            prof = part.profiles[int(row)]
            texts.setdefault(prof.to_text(), prof)
    ordered = sorted(texts)
    index = {t: i for i, t in enumerate(ordered)}
    profiles = [{"profile_index": i, "profile_text": t, "profile": texts[t].to_dict()} for i, t in enumerate(ordered)]
    records: dict[str, list[dict]] = {}
    for split in SPLITS:
        pairs = selection.pairs.get(split, np.zeros((0, 2), dtype=np.int64))
        out = []
        for row, col in pairs.tolist():
            text = data.splits[split].profiles[row].to_text()
            out.append(data.record(split, row, col, index[text], held_out=text in selection.held_out))
        records[split] = out
    return records, profiles


def _truth_file(data: WVBData) -> Optional[Path]:
    candidate = data.paths.data_dir.parent / "truth.json"
    return candidate if candidate.is_file() else None


def prepare_wvb(
    wvb: Union[PathLike, WVBData],
    out: PathLike,
    *,
    train_pairs: Union[int, str],
    test_pairs: Union[int, str],
    valid_pairs: Union[int, str] = 0,
    seed: int = 0,
    holdout_countries: Optional[Sequence[str]] = None,
    holdout_fraction: Optional[float] = None,
    holdout_test_keeps_seen: bool = False,
    held_out_pairs: Optional[Mapping[str, int]] = None,
    encoder: Any = "default",
    encoder_device: Optional[str] = "auto",
    question_ids: Optional[Sequence[str]] = None,
    overwrite: bool = False,
    command: Optional[Sequence[str]] = None,
) -> dict[str, Any]:
    """Write the prepared-data directory of ``docs/data-schema.md`` to ``out`` (atomically); returns the manifest.

    ``wvb``: a WVB checkout (or synthetic population) path, or an already loaded :class:`WVBData`. ``encoder``:
    ``"default"`` (the embedded MiniLM), a model id / folder, a ready :class:`cuma.ProfileEncoder`, or ``None`` to
    skip ``profile_embeds.safetensors``; ``encoder_device``: where it runs (``"auto"``: CUDA when available).
    When the source holds a synthetic ``truth.json`` it is copied, and the oracle figures of the written test
    records go into the manifest (``oracle_test``).
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {seed!r}")
    data = wvb if isinstance(wvb, WVBData) else load_wvb(wvb, question_ids=question_ids)
    spec = HoldoutSpec(
        countries=tuple(holdout_countries or ()),
        fraction=float(holdout_fraction or 0.0),
        test_keeps_seen=holdout_test_keeps_seen,
        held_out_pairs=tuple((held_out_pairs or {}).items()),
    )
    selection = select_pairs(
        data, train_pairs=train_pairs, test_pairs=test_pairs, valid_pairs=valid_pairs, seed=seed, holdout=spec
    )
    records, profiles = build_records(data, selection)
    from ..encoder import resolve_encoder

    enc = resolve_encoder(encoder, encoder_device)
    encoder_name = None if enc is None else (encoder if isinstance(encoder, str) else getattr(enc, "source", None))
    embeds = None
    if enc is not None and profiles:
        import torch

        embeds = enc.encode([p["profile_text"] for p in profiles]).detach().to("cpu", torch.float32).contiguous()
        if embeds.shape != (len(profiles), enc.dim):
            raise RuntimeError(f"encoder returned {tuple(embeds.shape)}, expected ({len(profiles)}, {enc.dim})")
    truth_path = _truth_file(data)
    inputs = {
        name: {"path": str(Path(path).resolve()), "sha256": sha256_file(path)}
        for name, path in data.input_files().items()
    }
    if truth_path is not None:
        inputs["truth.json"] = {"path": str(truth_path.resolve()), "sha256": sha256_file(truth_path)}

    with atomic_directory(out, overwrite=overwrite) as tmp:
        for split in SPLITS:
            write_jsonl(tmp / f"{split}.jsonl", records[split])
        write_jsonl(tmp / "profiles.jsonl", profiles)
        embeddings_info = None
        if embeds is not None:
            from safetensors.torch import save_file

            save_file(
                {EMBEDS_KEY: embeds},
                str(tmp / EMBEDS_FILE),
                metadata={
                    "encoder": str(getattr(enc, "source", "")),
                    "dim": str(enc.dim),
                    "profiles": "profiles.jsonl",
                },
            )
            embeddings_info = {"file": EMBEDS_FILE, "key": EMBEDS_KEY, "shape": list(embeds.shape), "dtype": "float32"}
        oracle_test = None
        if truth_path is not None:
            shutil.copyfile(truth_path, tmp / "truth.json")
            from .synthetic import load_truth, oracle_metrics

            if records["test"]:
                oracle_test = oracle_metrics(records["test"], load_truth(tmp / "truth.json"))
        manifest = {
            "format": PREPARED_FORMAT,
            "format_version": PREPARED_VERSION,
            "dataset": "synthetic" if truth_path is not None else "wvb",
            "command": list(command) if command is not None else None,
            "options": {
                "wvb": str(data.paths.data_dir.parent.resolve()),
                "train_pairs": "all" if parse_pair_count(train_pairs) == ALL else int(train_pairs),
                "valid_pairs": "all" if parse_pair_count(valid_pairs) == ALL else int(valid_pairs),
                "test_pairs": "all" if parse_pair_count(test_pairs) == ALL else int(test_pairs),
                "seed": seed,
                "holdout": spec.describe(),
                "encoder": encoder_name,
                "questions": list(question_ids) if question_ids is not None else None,
            },
            "seed": seed,
            "source": {"data_dir": str(data.paths.data_dir.resolve()), "files": inputs},
            "questions": {
                "count": len(data.questions),
                "ids": data.question_ids,
                "recoded": {qid: data.recoded[qid] for qid in data.recoded},
                "unlabelled_options": {q.id: list(q.unlabelled) for q in data.questions if q.unlabelled},
            },
            "counts": {
                "participants": {s: p.num_participants for s, p in data.splits.items()},
                "participants_used": selection.participants_used,
                "pairs_available": selection.pairs_available,
                "records": {s: len(records[s]) for s in SPLITS},
                "profiles": len(profiles),
                "held_out_profiles": len(selection.held_out),
                "held_out_profiles_written": sum(1 for p in profiles if p["profile_text"] in selection.held_out),
            },
            "dropped": {
                "answers": data.dropped,
                "answers_by_split": data.dropped_by_split,
                "answers_by_question": data.dropped_by_question,
                "participants": selection.participants_removed,
                "pairs_not_sampled": {
                    s: selection.pairs_available.get(s, 0) - len(records[s]) for s in SPLITS
                },
            },
            "demographics": {
                "fields": dict(_field_map()),
                "missing_values": data.demographic_missing,
                "codes_mapped_to_labels": data.demographic_codes_mapped,
            },
            "held_out": {**spec.describe(), "active": spec.active, "num_profiles": len(selection.held_out)},
            "encoder": None if enc is None else (enc.describe() if hasattr(enc, "describe") else {"dim": enc.dim}),
            "embeddings": embeddings_info,
            "oracle_test": oracle_test,
            "outputs": {},
            "versions": package_versions(_VERSIONED, python=True),
        }
        manifest["outputs"] = {
            p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.name != "manifest.json"
        }
        atomic_write_json(tmp / "manifest.json", manifest)
    return manifest


def _field_map() -> Mapping[str, str]:
    from ..profiles import WVB_FIELD_MAP

    return WVB_FIELD_MAP

