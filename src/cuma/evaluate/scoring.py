"""Score multiple-choice records with a causal LM: one forward per batch, no generation.

For each record the prompt (``cuma.data.prompts.render_prompt``: chat template, generation prompt added) is
tokenized; the logits at the *answer position* -- the last non-pad token of the row, where the assistant's first
token is predicted -- are restricted to the record's option-letter token ids (``letter_token_ids``) and
softmaxed: that is the model's option distribution. Its argmax is the predicted option.

Padding on either side gives the same result: the answer position is the last position whose attention mask is 1
(right padding: ``attention_mask.sum(-1) - 1``; left padding: ``-1``), and position ids are computed from the mask
(``cumsum - 1``) so a left-padded row sees the same positions as an unpadded one (for prefix tuning PEFT adds
the number of virtual tokens; prompt-tuning adapters, which drop position ids, get none).

Methods that route on the profile (CuMA) get ``profile_embeds=(B, dim)``: row ``record["profile_index"]`` of the
prepared data's ``profile_embeds.safetensors`` for every record of the batch.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch

__all__ = [
    "answer_positions",
    "PromptBuilder",
    "build_prompts",
    "letter_ids_for",
    "letter_token_ids",
    "load_profile_table",
    "prediction",
    "render_prompt",
    "score_prompts",
    "score_records",
]


# ----------------------------------------------------------------------------------------------- prompts


def render_prompt(record, tokenizer, profile_in_prompt: bool = True, fewshot=None) -> str:
    """The prompt of one record: :func:`cuma.data.prompts.render_prompt` (chat template, generation prompt)."""
    from ..data.prompts import render_prompt as render

    return render(record, tokenizer, profile_in_prompt=profile_in_prompt, fewshot=fewshot)


def letter_token_ids(tokenizer, letters: Sequence[str]) -> list[int]:
    """Token id of each option letter at the start of the assistant turn (:func:`cuma.data.prompts.letter_token_ids`;
    a letter that is not exactly one token there is a ValueError)."""
    from ..data.prompts import letter_token_ids as ids

    return list(ids(tokenizer, letters))


class PromptBuilder:
    """Renders the prompt of a record; with ``fewshot_k > 0`` the record gets
    ``select_fewshot(fewshot_pool, record, k, seed, key)`` shots (same-group training records when there are enough)
    as prior turns. Built once per run: the pool is grouped by ``key`` here, and each target hands
    ``select_fewshot`` only its own group when that group has more than ``k`` records -- the same filtered list and
    the same seeded draw, so the same shots, in O(group) instead of O(pool) time."""

    def __init__(
        self,
        tokenizer,
        profile_in_prompt: bool = True,
        fewshot_pool: Optional[Sequence[Mapping[str, Any]]] = None,
        fewshot_k: int = 0,
        fewshot_seed: int = 0,
        fewshot_key: str = "country",
    ) -> None:
        self.tokenizer = tokenizer
        self.profile_in_prompt = profile_in_prompt
        self.pool = fewshot_pool
        self.k = int(fewshot_k)
        self.seed = fewshot_seed
        self.key = fewshot_key
        self.groups: dict = {}
        if self.k < 0:
            raise ValueError(f"fewshot_k must be >= 0, got {fewshot_k}")
        if self.k > 0:
            if not fewshot_pool:
                raise ValueError("few-shot prompting needs training records to draw shots from (fewshot_pool is empty)")
            from .fewshot import _field

            self._field = _field
            for r in fewshot_pool:
                try:
                    self.groups.setdefault(_field(r, fewshot_key), []).append(r)
                except TypeError:  # an unhashable group value: no shortcut
                    self.groups = {}
                    break

    def shots(self, record: Mapping[str, Any]) -> Optional[list]:
        if self.k == 0:
            return None
        from .fewshot import select_fewshot

        value = self._field(record, self.key)
        sub = self.groups.get(value) if self.groups and value is not None else None
        pool = sub if sub is not None and len(sub) > self.k else self.pool
        return select_fewshot(pool, record, self.k, seed=self.seed, key=self.key)

    def __call__(self, record: Mapping[str, Any]) -> str:
        return render_prompt(record, self.tokenizer, profile_in_prompt=self.profile_in_prompt, fewshot=self.shots(record))


def build_prompts(
    records: Sequence[Mapping[str, Any]],
    tokenizer,
    profile_in_prompt: bool = True,
    fewshot_pool: Optional[Sequence[Mapping[str, Any]]] = None,
    fewshot_k: int = 0,
    fewshot_seed: int = 0,
    fewshot_key: str = "country",
) -> list[str]:
    """One prompt string per record (see :class:`PromptBuilder`)."""
    build = PromptBuilder(tokenizer, profile_in_prompt, fewshot_pool, fewshot_k, fewshot_seed, fewshot_key)
    return [build(rec) for rec in records]


def letter_ids_for(tokenizer, records: Sequence[Mapping[str, Any]]) -> list[list[int]]:
    """Valid letter token ids of each record (computed once per distinct letter set)."""
    cache: dict[tuple, list[int]] = {}
    out = []
    for rec in records:
        key = tuple(rec["letters"])
        if key not in cache:
            cache[key] = letter_token_ids(tokenizer, list(key))
        out.append(cache[key])
    return out


# ----------------------------------------------------------------------------------------------- profiles


def load_profile_table(path: str) -> torch.Tensor:
    """The ``profile_embeds`` tensor ``(num_profiles, dim)`` of a prepared-data ``profile_embeds.safetensors``; a file
    that cannot be read as one is a ValueError naming it (:func:`cuma.data.records.read_profile_embeds`)."""
    from ..data.records import read_profile_embeds

    return read_profile_embeds(path)


# ----------------------------------------------------------------------------------------------- forward


def answer_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-pad token of each row (``attention_mask.sum(-1) - 1`` under right padding, ``T - 1``
    under left padding; computed as the position of the last 1, which covers both)."""
    mask = attention_mask.to(torch.long)
    if (mask.sum(-1) == 0).any():
        raise ValueError("a row of the batch has no tokens")
    pos = torch.arange(mask.shape[1], device=mask.device)
    return (mask * (pos + 1)).argmax(-1)


def _takes_position_ids(model) -> bool:
    """False for prompt-learning adapters whose PEFT wrapper drops position ids (prompt tuning, P-tuning); prefix
    tuning takes them (PEFT offsets them by the number of virtual tokens)."""
    cfg = getattr(model, "active_peft_config", None)
    if not getattr(cfg, "is_prompt_learning", False):
        return True
    kind = getattr(cfg.peft_type, "value", cfg.peft_type)
    return str(kind) in ("PREFIX_TUNING", "CARTRIDGE")


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def _forward_answer_logits(model, input_ids, attention_mask, extra: dict, use_positions: bool) -> torch.Tensor:
    """Logits (B, V) at the answer position of each row, from one forward."""
    last = answer_positions(attention_mask)
    kwargs = dict(extra)
    if use_positions:
        kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    uniq, inverse = torch.unique(last, return_inverse=True)
    keep: Any = 1 if (uniq.numel() == 1 and int(uniq[0]) == input_ids.shape[1] - 1) else uniq
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, use_cache=False, **kwargs)
        logits = out.logits
        if logits.shape[1] == (1 if isinstance(keep, int) else uniq.numel()):
            cols = torch.zeros_like(last) if isinstance(keep, int) else inverse
            return logits[torch.arange(logits.shape[0], device=logits.device), cols.to(logits.device)]
    except TypeError as err:  # a model without logits_to_keep: take the full logits
        if "logits_to_keep" not in str(err):
            raise
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    logits = out.logits
    return logits[torch.arange(logits.shape[0], device=logits.device), last.to(logits.device)]


@torch.no_grad()
def score_prompts(
    model,
    tokenizer,
    prompts: Sequence[str],
    letter_ids: Sequence[Sequence[int]],
    *,
    batch_size: int = 32,
    profile_rows: Optional[torch.Tensor] = None,
    progress: bool = True,
    desc: str = "scoring",
    sort_by_length: bool = True,
    add_special_tokens: bool = False,
    on_batch: Optional[Callable[[int], None]] = None,
    on_rows: Optional[Callable[[list[int]], None]] = None,
) -> list[np.ndarray]:
    """Option distribution of each prompt: softmax over ``logits[answer position, letter_ids[i]]``.

    ``profile_rows``: ``(len(prompts), dim)`` profile embeddings passed as ``profile_embeds`` (one row per prompt),
    or None. Prompts are batched by length (longest first, so memory problems show at once) and the results are
    returned in input order. The rendered chat text already holds the template's special tokens, so
    ``add_special_tokens`` is False by default. The progress bar goes to stderr. ``on_batch`` gets the size of each
    finished batch, ``on_rows`` its prompts' indices (input order), right after its forward: e.g. to read what a
    :func:`cuma.routing.record_gates` block recorded for those prompts.
    """
    if len(prompts) != len(letter_ids):
        raise ValueError(f"{len(prompts)} prompts but {len(letter_ids)} letter-id lists")
    if profile_rows is not None and profile_rows.shape[0] != len(prompts):
        raise ValueError(f"profile_rows has {profile_rows.shape[0]} rows for {len(prompts)} prompts")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    n = len(prompts)
    if n == 0:
        return []
    from tqdm.auto import tqdm

    encoded = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
    order = sorted(range(n), key=lambda i: -len(encoded[i])) if sort_by_length else list(range(n))
    device = _model_device(model)
    use_positions = _takes_position_ids(model)
    was_training = model.training
    model.eval()
    results: list[Optional[np.ndarray]] = [None] * n
    bar = tqdm(total=n, desc=desc, unit="pair", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    try:
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, padding=True, return_tensors="pt")
            ids = batch["input_ids"].to(device)
            mask = batch["attention_mask"].to(device)
            extra = {}
            if profile_rows is not None:
                extra["profile_embeds"] = profile_rows[idx].to(device)
            logits = _forward_answer_logits(model, ids, mask, extra, use_positions).float()
            for row, i in enumerate(idx):
                sel = logits[row, torch.as_tensor(list(letter_ids[i]), device=logits.device)]
                results[i] = torch.softmax(sel.double(), dim=-1).cpu().numpy()
            bar.update(len(idx))
            if on_batch is not None:
                on_batch(len(idx))
            if on_rows is not None:
                on_rows(list(idx))
    finally:
        bar.close()
        if was_training:
            model.train()
    return results  # type: ignore[return-value]


def score_records(
    model,
    tokenizer,
    records: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 32,
    profile_table: Optional[torch.Tensor] = None,
    profile_in_prompt: bool = True,
    fewshot_pool: Optional[Sequence[Mapping[str, Any]]] = None,
    fewshot_k: int = 0,
    fewshot_seed: int = 0,
    fewshot_key: str = "country",
    progress: bool = True,
    desc: str = "scoring",
    chunk_size: int = 8192,
    on_rows: Optional[Callable[[list[int]], None]] = None,
) -> list[dict[str, Any]]:
    """Score WVB-format records (docs/data-schema.md) and return one prediction dict per record, in input order.

    ``profile_table``: the prepared data's ``(num_profiles, dim)`` profile embeddings, for methods that route on
    the profile; each record gets row ``record["profile_index"]``. None for every other method. Records are
    scored ``chunk_size`` at a time (prompts rendered, tokenized and batched longest-first within a chunk).

    Each returned dict holds the record's ``id``, ``participant_id``, ``question_id``, ``profile``, ``held_out``,
    ``letters``, ``option_values``, ``scale_min``, ``scale_max``, ``ordinal``, ``gold_letter``, ``gold_value``,
    ``gold_index``, plus ``probs`` (the option distribution, a list of floats in letter order), ``pred_index``,
    ``pred_letter`` and ``pred_value`` -- exactly what :func:`cuma.evaluate.choice.compute_metrics` reads.
    ``on_rows``: called after each batch's forward with the indices (into ``records``) of the records it scored.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    index = None
    if profile_table is not None:
        idx = []
        for rec in records:
            pi = rec.get("profile_index")
            if pi is None or not (0 <= int(pi) < profile_table.shape[0]):
                raise ValueError(
                    f"record {rec.get('id')!r}: profile_index {pi!r} is not a row of the profile table "
                    f"({profile_table.shape[0]} rows)"
                )
            idx.append(int(pi))
        index = torch.as_tensor(idx, dtype=torch.long)
    build = PromptBuilder(tokenizer, profile_in_prompt, fewshot_pool, fewshot_k, fewshot_seed, fewshot_key)
    letter_ids = letter_ids_for(tokenizer, records)
    from tqdm.auto import tqdm

    out: list[dict[str, Any]] = []
    bar = tqdm(total=len(records), desc=desc, unit="pair", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    try:
        # prompts are rendered and tokenized one chunk at a time, so memory stays bounded on millions of pairs
        for start in range(0, len(records), chunk_size):
            part = records[start : start + chunk_size]
            rows = None
            if index is not None:
                rows = profile_table[index[start : start + chunk_size]]
            dists = score_prompts(
                model, tokenizer, [build(rec) for rec in part], letter_ids[start : start + chunk_size],
                batch_size=batch_size, profile_rows=rows, progress=False, on_batch=bar.update,
                on_rows=None if on_rows is None else (lambda idx, _s=start: on_rows([_s + i for i in idx])),
            )
            out.extend(prediction(rec, p) for rec, p in zip(part, dists))
    finally:
        bar.close()
    return out


def prediction(record: Mapping[str, Any], probs: Sequence[float]) -> dict[str, Any]:
    """The prediction dict of one record given its option distribution (argmax; ties go to the first option)."""
    p = np.asarray(probs, dtype=np.float64)
    letters = list(record["letters"])
    if p.size != len(letters):
        raise ValueError(f"record {record.get('id')!r}: {p.size} probabilities for {len(letters)} options")
    k = int(np.argmax(p))
    values = list(record["option_values"])
    return {
        "id": record.get("id"),
        "participant_id": record.get("participant_id"),
        "question_id": record["question_id"],
        "profile": dict(record.get("profile") or {}),
        "held_out": bool(record.get("held_out", False)),
        "letters": letters,
        "option_values": values,
        "scale_min": record["scale_min"],
        "scale_max": record["scale_max"],
        "ordinal": bool(record.get("ordinal", True)),
        "gold_letter": record["gold_letter"],
        "gold_value": record["gold_value"],
        "gold_index": letters.index(record["gold_letter"]),
        "probs": [float(x) for x in p],
        "pred_index": k,
        "pred_letter": letters[k],
        "pred_value": values[k],
    }
