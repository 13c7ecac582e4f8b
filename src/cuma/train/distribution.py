"""Distribution matching on opinion cells (``train.objective: distribution``).

One training example per (group, question) cell of a prepared opinions folder (``cuma data opinions``): the prompt is
the one ``cuma eval opinions`` scores (the group's profile, the question, lettered options), and the loss at the
answer position is the cross-entropy of the softmax over the cell's option-letter logits -- the very tokens the
evaluation scores -- against the cell's target distribution, ``-sum_k t_k log p_k`` (forward KL(t || p) plus the
target's entropy, a constant). Optional terms:

- ``train.cell_weighting: weight``: each cell's term weighted by its ``weight`` (respondents or survey weight);
  ``none`` (default): every cell counts once.
- ``train.cdf_loss_weight`` > 0: on ordinal questions, plus that many times the normalised W1 distance between the
  predicted and target distributions on the option order, ``sum_k |P_k - T_k| / (K - 1)`` over the cumulative sums
  (the evaluation's ``w1_ordinal``; SubPOP-style EMD term).

The weighted mean is taken over the whole optimizer batch: every row carries the batch's total weight
(``cell_weight_total``), so micro-batches (``train.split_by_length``) add up to the batch's loss exactly. Routed
methods keep their balance loss: :class:`cuma.train.sft.DistributionSFTTrainer` replaces only the task loss of
:class:`~cuma.train.sft.ProfileSFTTrainer` with :func:`distribution_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ..data.prompts import letter_token_ids, render_prompt
from .collator import ProfileCollator

__all__ = [
    "CELL_WEIGHTINGS",
    "OBJECTIVES",
    "DistributionCollator",
    "answer_logits",
    "check_objective",
    "distribution_loss",
    "tokenize_cell",
]

OBJECTIVES = ("sft", "distribution")
CELL_WEIGHTINGS = ("none", "weight")


def check_objective(train) -> None:
    """Refuse unknown ``train.objective`` / ``train.cell_weighting`` values and a negative ``cdf_loss_weight``."""
    if train.objective not in OBJECTIVES:
        raise ValueError(f"train.objective: expected one of {list(OBJECTIVES)}, got {train.objective!r}")
    if train.cell_weighting not in CELL_WEIGHTINGS:
        raise ValueError(f"train.cell_weighting: expected one of {list(CELL_WEIGHTINGS)}, got {train.cell_weighting!r}")
    w = train.cdf_loss_weight
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
        raise ValueError(f"train.cdf_loss_weight must be a number >= 0, got {w!r}")
    if train.objective == "sft" and (train.cell_weighting != "none" or w):
        raise ValueError("train.cell_weighting and train.cdf_loss_weight apply to train.objective=distribution only; "
                         f"the objective is {train.objective!r}")


def _target(record: dict) -> list[float]:
    rid = record.get("id", record.get("cell_id"))
    target = record.get("target")
    letters = record.get("letters") or []
    if not isinstance(target, (list, tuple)) or len(target) != len(letters) or len(letters) < 2:
        raise ValueError(f"cell {rid!r}: 'target' must be a list with one probability per option "
                         f"({len(letters)} options), got {target!r}")
    t = [float(x) for x in target]
    if any(not (x >= 0.0) for x in t) or abs(sum(t) - 1.0) > 1e-6:
        raise ValueError(f"cell {rid!r}: 'target' must be non-negative and sum to 1 (within 1e-6), got {t}")
    return t


def tokenize_cell(record: dict, tokenizer, profile_in_prompt: bool, max_length: int,
                  letter_ids: Optional[Sequence[int]] = None) -> dict:
    """The cell's prompt (the evaluation's, generation prompt included, so its last token is the answer position)
    tokenised and left-truncated to ``max_length``, with its letter token ids, target, weight and ordinal flag."""
    rid = record.get("id", record.get("cell_id"))
    target = _target(record)
    prompt = render_prompt(record, tokenizer, profile_in_prompt=profile_in_prompt)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][-max_length:]
    if letter_ids is None:
        letter_ids = letter_token_ids(tokenizer, list(record["letters"]))
    weight = record.get("weight", 1.0)
    weight = 1.0 if weight is None else float(weight)
    if not weight > 0:
        raise ValueError(f"cell {rid!r}: 'weight' must be > 0, got {record.get('weight')!r}")
    return {
        "input_ids": list(ids),
        "letter_ids": [int(i) for i in letter_ids],
        "target": target,
        "cell_weight": weight,
        "ordinal": bool(record.get("ordinal", False)),
        "profile_index": int(record.get("profile_index", -1)),
        "profile_text": record.get("profile_text", ""),
    }


@dataclass
class DistributionCollator(ProfileCollator):
    """Right-pads tokenised cells and adds ``letter_ids`` / ``target`` (B, K_max; padded options have target 0 and
    are masked out by ``letter_mask``), ``cell_weight`` (B,), ``cell_weight_total`` (B,: the batch's total weight on
    every row), ``ordinal`` (B,) and, for routed methods, ``profile_embeds``. No ``labels``: there is no token loss."""

    use_weights: bool = False

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        rows = len(examples)
        length = max(len(e["input_ids"]) for e in examples)
        k = max(len(e["letter_ids"]) for e in examples)
        ids = torch.full((rows, length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((rows, length), dtype=torch.long)
        letters = torch.zeros((rows, k), dtype=torch.long)
        letter_mask = torch.zeros((rows, k), dtype=torch.bool)
        target = torch.zeros((rows, k), dtype=torch.float32)
        for i, e in enumerate(examples):
            n, m = len(e["input_ids"]), len(e["letter_ids"])
            ids[i, :n] = torch.as_tensor(e["input_ids"], dtype=torch.long)
            mask[i, :n] = 1
            letters[i, :m] = torch.as_tensor(e["letter_ids"], dtype=torch.long)
            letter_mask[i, :m] = True
            target[i, :m] = torch.as_tensor(e["target"], dtype=torch.float32)
        weight = torch.as_tensor([float(e["cell_weight"]) if self.use_weights else 1.0 for e in examples])
        batch = {
            "input_ids": ids, "attention_mask": mask, "letter_ids": letters, "letter_mask": letter_mask,
            "target": target, "cell_weight": weight, "cell_weight_total": weight.sum().expand(rows).clone(),
            "ordinal": torch.as_tensor([bool(e["ordinal"]) for e in examples]),
        }
        if self.uses_profile:
            batch["profile_embeds"] = self.profile_rows(examples)
        return batch


def distribution_loss(letter_logits: torch.Tensor, letter_mask: torch.Tensor, target: torch.Tensor,
                      weight: torch.Tensor, weight_total: torch.Tensor, ordinal: Optional[torch.Tensor] = None,
                      cdf_weight: float = 0.0) -> torch.Tensor:
    """``sum_i w_i * (CE(t_i, softmax(z_i)) + cdf_weight * [ordinal_i] * W1_i) / weight_total`` over the rows.

    ``letter_logits`` (B, K): the logits of each row's option letters (columns where ``letter_mask`` is False are
    padding and take no probability); ``target`` (B, K) sums to 1 over the valid columns; W1 is the normalised
    1-D Wasserstein distance on the option order."""
    z = letter_logits.float().masked_fill(~letter_mask, float("-inf"))
    logp = torch.log_softmax(z, dim=-1)
    t = target.to(logp.dtype)
    ce = -(t * logp.masked_fill(~letter_mask, 0.0)).sum(-1)
    per_row = ce
    if cdf_weight and ordinal is not None and bool(ordinal.any()):
        p = logp.exp().masked_fill(~letter_mask, 0.0)
        gap = (p.cumsum(-1) - t.cumsum(-1)).abs()[:, :-1]  # the last cumulative sums are 1 for both
        n = letter_mask.sum(-1).to(gap.dtype)
        w1 = (gap * letter_mask[:, 1:].to(gap.dtype)).sum(-1) / (n - 1).clamp_min(1)
        per_row = per_row + cdf_weight * w1 * ordinal.to(w1.dtype)
    w = weight.to(per_row.dtype)
    return (w * per_row).sum() / weight_total.to(per_row.dtype)[0]


def answer_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra) -> torch.Tensor:
    """Logits (B, V) at each right-padded row's last token (its answer position), projecting only those positions
    through the LM head where the model takes ``logits_to_keep``."""
    last = attention_mask.long().sum(-1) - 1
    if (last < 0).any():
        raise ValueError("a row of the batch has no tokens")
    uniq, inverse = torch.unique(last, return_inverse=True)
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=uniq, use_cache=False, **extra)
        if out.logits.shape[1] == uniq.numel():
            return out.logits[torch.arange(out.logits.shape[0], device=out.logits.device), inverse.to(out.logits.device)]
    except TypeError as err:  # a model without logits_to_keep
        if "logits_to_keep" not in str(err):
            raise
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
    return out.logits[torch.arange(out.logits.shape[0], device=out.logits.device), last.to(out.logits.device)]


# ------------------------------------------------------------------------------------------------- run_sft's parts


class CellData:
    """The training view of a prepared opinions folder for :func:`~cuma.train.sft.run_sft`: ``split(name)`` gives the
    cells as prompt records (:func:`cuma.data.opinions.cell_to_record`), ``profile_embeds`` the groups' table,
    ``path`` / ``split_file`` what the run record hashes."""

    def __init__(self, path) -> None:
        from pathlib import Path

        from ..data.opinions import load_opinions

        self.path = Path(path)
        self.opinions = load_opinions(self.path)
        self.profile_embeds = self.opinions.profile_embeds

    def split(self, name: str) -> list[dict]:
        return opinion_records(self.opinions, name)

    def split_file(self, name: str):
        from ..data.opinions import cells_file

        return self.path / cells_file(name)


def opinion_records(opinions, split: str) -> list[dict]:
    """Every cell of ``split`` as the prompt record the evaluation scores (:meth:`OpinionData.records`: the WVB
    record plus ``target``, ``weight``, ``ordinal`` and the group's ``profile_index``)."""
    return opinions.records(split)


def load_cells(path) -> CellData:
    """The opinions folder at ``path`` for distribution training (``train.objective: distribution``)."""
    return CellData(path)


def cell_tokenizer(tokenizer):
    """``tokenize(record, tokenizer, profile_in_prompt, max_length)`` for cells, with the letter ids of each distinct
    letter set computed once."""
    cache: dict[tuple, list[int]] = {}

    def tokenize(record, tok, profile_in_prompt, max_length):
        key = tuple(record["letters"])
        if key not in cache:
            cache[key] = letter_token_ids(tok, list(key))
        return tokenize_cell(record, tok, profile_in_prompt, max_length, letter_ids=cache[key])

    return tokenize


def objective_parts(train, collator: ProfileCollator):
    """The collator and trainer keywords of the distribution objective, from the token collator's padding and profile
    settings (the trainer is :class:`cuma.train.sft.DistributionSFTTrainer`)."""
    cells = DistributionCollator(pad_token_id=collator.pad_token_id, profile_table=collator.profile_table,
                                 encoder=collator.encoder, uses_profile=collator.uses_profile,
                                 use_weights=train.cell_weighting == "weight")
    return cells, {"cdf_loss_weight": train.cdf_loss_weight}
