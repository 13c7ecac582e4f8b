"""Chat prompts for WVB-format choice records (``docs/data-schema.md``).

A record becomes a short conversation::

    system:    SYSTEM_INSTRUCTION  [+ "\\n" + PROFILE_PREFIX + profile sentence, when profile_in_prompt]
    user:      <question>
               A. <option 1>
               B. <option 2>
               ...
               Answer with the letter only.
    assistant: <gold letter>          (answer_text; the SFT target)

Few-shot examples (``fewshot``: a list of records) come before the asked record as complete user/assistant turns.
:func:`render_prompt` applies the tokenizer's chat template with the generation prompt, so the next token the model
produces is the option letter; :func:`letter_token_ids` gives the token id of each letter at that position and
refuses letters that do not encode to exactly one token there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

__all__ = [
    "ANSWER_INSTRUCTION",
    "PROFILE_PREFIX",
    "SYSTEM_INSTRUCTION",
    "answer_text",
    "format_user_message",
    "letter_token_ids",
    "render_messages",
    "render_prompt",
]

SYSTEM_INSTRUCTION = (
    "Answer this values survey as yourself."
)
PROFILE_PREFIX = "About you: "
ANSWER_INSTRUCTION = "Answer with the letter only."

_REQUIRED = ("question", "letters", "options")


def _check(record: Any, what: str = "record") -> None:
    if not isinstance(record, Mapping):
        raise ValueError(f"{what} must be a mapping (a WVB record), got {type(record).__name__}")
    missing = [k for k in _REQUIRED if k not in record]
    if missing:
        raise ValueError(f"{what} {record.get('id', '?')!r} lacks the fields {missing} needed for a prompt")
    letters, options = record["letters"], record["options"]
    if not isinstance(letters, Sequence) or not isinstance(options, Sequence) or len(letters) != len(options):
        raise ValueError(
            f"{what} {record.get('id', '?')!r}: 'letters' and 'options' must be lists of equal length, got "
            f"{letters!r} and {options!r}"
        )
    if not options:
        raise ValueError(f"{what} {record.get('id', '?')!r} has no options")


def system_message(record: Mapping[str, Any], profile_in_prompt: bool = True) -> str:
    text = SYSTEM_INSTRUCTION
    profile = str(record.get("profile_text") or "").strip() if profile_in_prompt else ""
    if profile:
        text = f"{text}\n{PROFILE_PREFIX}{profile}"
    return text


def format_user_message(record: Mapping[str, Any]) -> str:
    """The question, one ``"A. label"`` line per option, then :data:`ANSWER_INSTRUCTION`."""
    _check(record)
    lines = [str(record["question"]).strip()]
    lines += [f"{letter}. {option}" for letter, option in zip(record["letters"], record["options"])]
    lines.append(ANSWER_INSTRUCTION)
    return "\n".join(lines)


def answer_text(record: Mapping[str, Any]) -> str:
    """The assistant's whole answer: the gold letter (the SFT target)."""
    if not isinstance(record, Mapping) or not isinstance(record.get("gold_letter"), str):
        rid = record.get("id", "?") if isinstance(record, Mapping) else "?"
        raise ValueError(f"record {rid!r} has no 'gold_letter' string")
    return record["gold_letter"]


def render_messages(
    record: Mapping[str, Any],
    profile_in_prompt: bool = True,
    fewshot: Optional[Sequence[Mapping[str, Any]]] = None,
) -> list[dict[str, str]]:
    """The conversation for ``record``: system, [few-shot user/assistant turns], user. No assistant turn at the end."""
    _check(record)
    messages = [{"role": "system", "content": system_message(record, profile_in_prompt)}]
    for i, example in enumerate(fewshot or ()):
        _check(example, what=f"fewshot[{i}]")
        messages.append({"role": "user", "content": format_user_message(example)})
        messages.append({"role": "assistant", "content": answer_text(example)})
    messages.append({"role": "user", "content": format_user_message(record)})
    return messages


def render_prompt(
    record: Mapping[str, Any],
    tokenizer: Any,
    profile_in_prompt: bool = True,
    fewshot: Optional[Sequence[Mapping[str, Any]]] = None,
) -> str:
    """``tokenizer.apply_chat_template(render_messages(...), tokenize=False, add_generation_prompt=True)``."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no chat_template; use an instruct/chat tokenizer or set "
            "tokenizer.chat_template"
        )
    messages = render_messages(record, profile_in_prompt=profile_in_prompt, fewshot=fewshot)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _encode(tokenizer: Any, text: str) -> list[int]:
    out = tokenizer(text, add_special_tokens=False)
    ids = out["input_ids"] if isinstance(out, Mapping) or hasattr(out, "keys") else out
    return list(ids)


def letter_token_ids(tokenizer: Any, letters: Sequence[str]) -> list[int]:
    """Token id of each letter as the first token of the assistant turn.

    The check uses the tokenizer's chat template (a one-question conversation with the generation prompt): the
    prompt followed by the letter must tokenize as the prompt's tokens plus exactly one more token. Without a chat
    template the letter must encode alone to one token. Raises ``ValueError`` naming the letter otherwise, or when
    two letters share a token.
    """
    letters = list(letters)
    if not letters:
        raise ValueError("letter_token_ids needs at least one letter")
    prefix = ""
    if getattr(tokenizer, "chat_template", None) is not None:
        probe = [{"role": "system", "content": SYSTEM_INSTRUCTION}, {"role": "user", "content": "Q?\nA. x\nB. y"}]
        prefix = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    base = _encode(tokenizer, prefix) if prefix else []
    ids: list[int] = []
    for letter in letters:
        if not isinstance(letter, str) or not letter:
            raise ValueError(f"option letters must be non-empty strings, got {letter!r}")
        full = _encode(tokenizer, prefix + letter)
        if full[: len(base)] != base or len(full) != len(base) + 1:
            extra = full[len(base):] if full[: len(base)] == base else full
            raise ValueError(
                f"option letter {letter!r} does not encode to exactly one token at the start of the assistant turn "
                f"with {type(tokenizer).__name__} (got tokens {extra}); choice scoring needs single-token letters"
            )
        ids.append(int(full[-1]))
    dup = {letters[i] for i in range(len(ids)) if ids.count(ids[i]) > 1}
    if dup:
        raise ValueError(f"option letters {sorted(dup)} share a token id; each letter needs its own token")
    return ids
