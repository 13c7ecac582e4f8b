"""Few-shot shot selection for the ``fewshot`` prompting baseline: :func:`select_fewshot` (pure, over plain dicts)."""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any, Mapping, Sequence


def _field(record: Mapping[str, Any], key: str) -> Any:
    cur: Any = record
    for part in key.split("."):
        if isinstance(cur, Mapping) and part in cur:
            cur = cur[part]
        else:
            cur = None
            break
    if cur is None and "." not in key:
        prof = record.get("profile") if isinstance(record, Mapping) else None
        if isinstance(prof, Mapping):
            cur = prof.get(key)
    return cur


def _stable_seed(seed: int, target: Mapping[str, Any]) -> int:
    text = json.dumps(target, sort_keys=True, default=str)
    digest = hashlib.sha256(f"{seed}\x00{text}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def select_fewshot(
    records: Sequence[Mapping[str, Any]],
    target_record: Mapping[str, Any],
    k: int,
    seed: int = 0,
    key: str = "country",
) -> list[Mapping[str, Any]]:
    """Pick ``k`` shots for ``target_record`` from training ``records``.

    Same-group shots (records whose ``key`` equals the target's; ``key`` may be dotted, and a plain key is also looked
    up under ``record["profile"]``) when at least ``k`` of them exist, else ``k`` records drawn at random from all of
    them. The target itself (or an identical copy) is never a shot. Deterministic for a given (seed, target): the
    random generator is seeded from ``seed`` and the target's content, so different targets get different shots.
    Returns fewer than ``k`` only when fewer records are available.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if k == 0:
        return []
    pool = [r for r in records if r is not target_record and r != target_record]
    rng = random.Random(_stable_seed(seed, target_record))
    group = _field(target_record, key)
    if group is not None:
        same = [r for r in pool if _field(r, key) == group]
        if len(same) >= k:
            return rng.sample(same, k)
    return rng.sample(pool, min(k, len(pool)))


__all__ = ["select_fewshot"]
