"""Helpers shared by the demo investigation scripts of this folder."""

from __future__ import annotations

from typing import Optional, Sequence


def valid_subset(records: Sequence[dict], limit: Optional[int]) -> list[dict]:
    """``--valid-limit`` of the demo scripts: the first ``limit`` seen-country valid records and the first
    ``limit // 2`` held-out ones (all of them for ``limit`` None or 0), so that scripts score the same pairs."""
    if not limit:
        return list(records)
    return ([r for r in records if not r["held_out"]][:limit] + [r for r in records if r["held_out"]][: limit // 2])
