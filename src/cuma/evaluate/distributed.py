"""Multi-process scoring: under ``torchrun`` / ``accelerate launch`` each rank scores a contiguous slice of the
records and the slices are gathered back in the original order (:func:`cuma.distributed.shard_bounds`,
:func:`cuma.distributed.gather_in_order`), so every rank holds the single-process predictions, each record once.
In one process it is :func:`cuma.evaluate.scoring.score_records`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from ..distributed import gather_in_order, rank_and_world, shard_bounds

__all__ = ["score_records_distributed"]


def score_records_distributed(model, tokenizer, records: Sequence[Any], *, score: Optional[Callable] = None, **kwargs):
    """:func:`cuma.evaluate.scoring.score_records` on this rank's slice of ``records`` (:func:`shard_bounds`), the
    slices gathered on every rank in the original order. Equals the single-process result record for record."""
    if score is None:
        from .scoring import score_records as score
    rank, world = rank_and_world()
    start, stop = shard_bounds(len(records), rank, world)
    local = score(model, tokenizer, records[start:stop], **kwargs) if stop > start else []
    gathered = gather_in_order(local)
    if len(gathered) != len(records):  # pragma: no cover - a rank saw different records
        raise RuntimeError(f"gathered {len(gathered)} predictions for {len(records)} records: ranks disagree on the data")
    return gathered
