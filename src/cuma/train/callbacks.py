"""Trainer callbacks that measure a run while it trains (a learning curve on held-back records)."""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from transformers import TrainerCallback


class ValidationCurve(TrainerCallback):
    """Scores a fixed list of choice records (e.g. valid pairs) at chosen global steps: accuracy on the records of
    seen profiles and on held-out ones (zero-shot), EMD and entropy, one row per step in :attr:`rows`.

    ``steps``: global steps to evaluate at; 0 scores the model before the first update. ``profile_table``: the
    prepared data's profile embeddings for methods that route on the profile, else None."""

    def __init__(
        self,
        steps: Iterable[int],
        tokenizer,
        records: Sequence[dict],
        *,
        profile_table: Optional[torch.Tensor],
        profile_in_prompt: bool,
        batch_size: int = 32,
        sink: Optional[Callable[[dict], None]] = None,
        extra: Optional[Callable[[Any], dict]] = None,
    ) -> None:
        self.steps = sorted({int(s) for s in steps})
        if any(s < 0 for s in self.steps):
            raise ValueError(f"evaluation steps must be >= 0, got {self.steps}")
        self.tokenizer, self.records = tokenizer, list(records)
        self.profile_table, self.profile_in_prompt = profile_table, profile_in_prompt
        self.batch_size, self.sink, self.extra = batch_size, sink, extra
        self.rows: list[dict] = []
        self.eval_seconds = 0.0

    def evaluate(self, model, step: int) -> dict:
        from ..evaluate.choice import compute_metrics
        from ..evaluate.scoring import score_records

        t0 = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                preds = score_records(model, self.tokenizer, self.records, batch_size=self.batch_size,
                                      profile_table=self.profile_table, profile_in_prompt=self.profile_in_prompt,
                                      progress=False)
            seen = [p for p in preds if not p["held_out"]]
            held = [p for p in preds if p["held_out"]]
            row: dict[str, Any] = {"step": step}
            if seen:
                m = compute_metrics(seen, per_question=False)
                row.update(accuracy=m["accuracy"], emd=m["emd"]["mean"], entropy=m["entropy"])
            if held:
                row["zero_shot_accuracy"] = compute_metrics(held, per_question=False)["accuracy"]
            if self.extra is not None:
                row.update(self.extra(model))
        finally:
            model.train(was_training)
        self.eval_seconds += time.perf_counter() - t0
        row["eval_seconds"] = round(time.perf_counter() - t0, 2)
        self.rows.append(row)
        if self.sink is not None:
            self.sink(row)
        return row

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if 0 in self.steps and model is not None:
            self.evaluate(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps and state.global_step > 0 and model is not None:
            self.evaluate(model, state.global_step)
