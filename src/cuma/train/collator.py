"""Tokenised conditional-SFT examples and the collator that carries ``profile_embeds`` into the batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ..data.prompts import answer_text, render_messages, render_prompt


def tokenize_example(record: dict, tokenizer, profile_in_prompt: bool, max_length: int) -> dict:
    """Prompt + answer tokenised with the chat template; ``completion_mask`` marks the assistant tokens (the loss).

    The prompt is rendered with the generation prompt and the full conversation with the assistant's answer; the
    answer tokens are the full conversation's suffix after the prompt. Prompts are truncated from the left so the
    answer always survives."""
    prompt = render_prompt(record, tokenizer, profile_in_prompt=profile_in_prompt)
    messages = render_messages(record, profile_in_prompt=profile_in_prompt)
    messages.append({"role": "assistant", "content": answer_text(record)})
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError(
            f"record {record.get('id')!r}: the chat template does not render the prompt as a prefix of the full "
            "conversation, so the assistant tokens cannot be located"
        )
    answer_ids = full_ids[len(prompt_ids) :]
    if not answer_ids:
        raise ValueError(f"record {record.get('id')!r}: the answer rendered to no tokens")
    keep = max_length - len(answer_ids)
    if keep <= 0:
        raise ValueError(f"data.max_length={max_length} is shorter than the answer of record {record.get('id')!r}")
    prompt_ids = prompt_ids[-keep:]
    return {
        "input_ids": prompt_ids + answer_ids,
        "completion_mask": [0] * len(prompt_ids) + [1] * len(answer_ids),
        "profile_index": int(record.get("profile_index", -1)),
        "profile_text": record.get("profile_text", ""),
    }


@dataclass
class ProfileCollator:
    """Pads a list of tokenised examples (right padding) and adds ``labels`` (assistant tokens only) and, for methods
    that route on the profile, ``profile_embeds`` looked up in the precomputed table or encoded on the fly."""

    pad_token_id: int
    profile_table: Optional[torch.Tensor] = None  # (num_profiles, dim)
    encoder: Any = None  # a cuma.ProfileEncoder, used when there is no table
    uses_profile: bool = True

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        length = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(examples), length), dtype=torch.long)
        labels = torch.full((len(examples), length), -100, dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            row = torch.as_tensor(e["input_ids"], dtype=torch.long)
            ids[i, :n] = row
            mask[i, :n] = 1
            completion = torch.as_tensor(e["completion_mask"], dtype=torch.bool)
            labels[i, :n] = torch.where(completion, row, torch.full_like(row, -100))
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if self.uses_profile:
            batch["profile_embeds"] = self.profile_rows(examples)
        return batch

    def profile_rows(self, examples: Sequence[dict]) -> torch.Tensor:
        if self.profile_table is not None:
            index = torch.as_tensor([int(e["profile_index"]) for e in examples])
            if (index < 0).any() or (index >= self.profile_table.shape[0]).any():
                raise ValueError(
                    f"profile_index out of range for the profile table of {self.profile_table.shape[0]} rows"
                )
            return self.profile_table[index]
        if self.encoder is None:
            raise ValueError("the method routes on the profile but there is neither a profile table nor an encoder")
        return self.encoder.encode([e["profile_text"] for e in examples])


def split_by_length(batch: dict, parts: int) -> list[dict]:
    """A right-padded batch as up to ``parts`` micro-batches of similar length: rows sorted by length (stable), cut
    into near-equal groups, each trimmed to its own longest row. Every tensor whose first dimension is the batch's is
    split along it (``profile_embeds`` too); 2-D ones of the batch's width are trimmed. Together the micro-batches
    hold exactly the batch's rows and tokens, with less padding: for a loss that sums over labelled tokens and
    divides by the batch's count, their gradients add up to the whole batch's."""
    if parts < 1:
        raise ValueError(f"split_by_length: parts must be >= 1, got {parts}")
    mask = batch.get("attention_mask")
    if parts == 1 or mask is None or mask.dim() != 2 or mask.shape[0] < 2:
        return [batch]
    rows, width = mask.shape
    if bool((mask[:, 1:] > mask[:, :-1]).any()):
        raise ValueError("split_by_length needs right padding (attention_mask 1s then 0s on every row)")
    lengths = mask.sum(dim=1)
    order = torch.argsort(lengths, stable=True)
    parts = min(parts, rows)
    out = []
    for k in range(parts):
        idx = order[(k * rows) // parts : ((k + 1) * rows) // parts]
        keep = max(1, int(lengths[idx].max()))
        part = {}
        for name, value in batch.items():
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == rows:
                value = value[idx.to(value.device)]
                if value.dim() == 2 and value.shape[1] == width:
                    value = value[:, :keep]
            part[name] = value
        out.append(part)
    return out
