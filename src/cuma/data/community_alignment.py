"""Community Alignment (CC-BY-4.0; one row per annotator x conversation) -> prepared preference folder
(``cuma data ca``).

Assumed row layout (``docs/preference.md``; every column name is in :data:`CA_COLUMNS`, change it there to adapt
to another export): ``conversation_id``, ``annotator_id``, the six ``annotator_*`` profile columns
(:data:`cuma.profiles.COMMUNITY_ALIGNMENT_FIELD_MAP`), and per turn ``k`` in first..fourth:
``{k}_turn_prompt``, ``{k}_turn_response_a`` .. ``_d`` and ``{k}_turn_preferred_response`` (``"A"``..``"D"``;
``"a"``, ``"response_a"``, ``"Response A"`` and ``1``..``4`` are read as well). The conversation continues from the
preferred response of each turn; a turn without a prompt ends it. A first turn with an unknown or missing preferred
label drops the row (counted); a later such turn cuts the thread there (counted).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

from ..profiles import COMMUNITY_ALIGNMENT_FIELD_MAP, Profile
from .conversations import (
    Conversation,
    Dropped,
    Turn,
    check_max_turns,
    load_table,
    prepare_preference,
    require_columns,
    text_of,
)

__all__ = ["CA_COLUMNS", "CA_LETTERS", "CA_TURN_PREFIXES", "load_community_alignment", "parse_preferred",
           "prepare_community_alignment"]

PathLike = Union[str, os.PathLike]

CA_LETTERS: tuple[str, ...] = ("A", "B", "C", "D")
CA_TURN_PREFIXES: tuple[str, ...] = ("first", "second", "third", "fourth")
# one place for every column name: "{turn}" is replaced by a CA_TURN_PREFIXES entry, "{letter}" by a lower-case letter
CA_COLUMNS: dict[str, str] = {
    "conversation_id": "conversation_id",
    "annotator_id": "annotator_id",
    "prompt": "{turn}_turn_prompt",
    "response": "{turn}_turn_response_{letter}",
    "preferred": "{turn}_turn_preferred_response",
}

_LABEL = re.compile(r"^(?:response)?[\s_\-]*([a-d1-4])$", re.IGNORECASE)


def parse_preferred(value: Any, letters: Sequence[str] = CA_LETTERS) -> Optional[int]:
    """Index of the preferred response from a label (``"A"``, ``"b"``, ``"response_c"``, ``"Response D"``, ``2``);
    None for a missing or unknown label."""
    text = text_of(value)
    if text is None:
        return None
    if text.endswith(".0"):
        text = text[:-2]
    m = _LABEL.match(text.strip())
    if not m:
        return None
    c = m.group(1).upper()
    idx = int(c) - 1 if c.isdigit() else ord(c) - ord("A")
    return idx if 0 <= idx < len(letters) else None


def _col(kind: str, turn: str, letter: str = "") -> str:
    return CA_COLUMNS[kind].format(turn=turn, letter=letter.lower())


def load_community_alignment(path: PathLike, field_map: Mapping[str, str] = COMMUNITY_ALIGNMENT_FIELD_MAP,
                             max_turns: Optional[int] = None) -> tuple[list[Conversation], Dropped, dict[str, Any]]:
    """Conversations (one per annotator x conversation, with the annotator's profile), drops and source counts."""
    max_turns = check_max_turns(max_turns)
    dropped = Dropped()
    rows = load_table(path)
    first = CA_TURN_PREFIXES[0]
    required = [CA_COLUMNS["conversation_id"], CA_COLUMNS["annotator_id"], _col("prompt", first),
                _col("preferred", first)] + [_col("response", first, x) for x in CA_LETTERS]
    require_columns(rows, required, f"Community Alignment {path}")
    turns_limit = len(CA_TURN_PREFIXES) if max_turns is None else min(max_turns, len(CA_TURN_PREFIXES))
    out: list[Conversation] = []
    seen: set[tuple[str, str]] = set()
    for r in rows:
        cid, aid = text_of(r.get(CA_COLUMNS["conversation_id"])), text_of(r.get(CA_COLUMNS["annotator_id"]))
        if cid is None or aid is None:
            dropped.add("rows", "row without conversation_id or annotator_id")
            continue
        if (cid, aid) in seen:
            dropped.add("rows", "duplicate (conversation_id, annotator_id)")
            continue
        seen.add((cid, aid))
        turns: list[Turn] = []
        for k, prefix in enumerate(CA_TURN_PREFIXES):
            prompt = text_of(r.get(_col("prompt", prefix)))
            if prompt is None:
                break  # the conversation ended
            if k >= turns_limit:
                dropped.add("turns", f"beyond --max-turns {max_turns}")
                continue
            responses = [text_of(r.get(_col("response", prefix, x))) or "" for x in CA_LETTERS]
            chosen = parse_preferred(r.get(_col("preferred", prefix)))
            reason = None
            if chosen is None:
                raw = r.get(_col("preferred", prefix))
                reason = "missing preferred-response label" if text_of(raw) is None else \
                    "unknown preferred-response label"
            elif not responses[chosen]:
                reason = "preferred response is empty"
            elif sum(1 for x in responses if x) < 2:
                reason = "fewer than two non-empty responses"
            if reason is not None:
                if k == 0:
                    dropped.add("rows", f"first turn: {reason}")
                else:
                    dropped.add("turns", f"{reason} (thread cut)")
                break
            turns.append(Turn(user=prompt, responses=responses, chosen=chosen))
        if not turns:
            if text_of(r.get(_col("prompt", first))) is None:
                dropped.add("rows", "empty conversation (no first-turn prompt)")
            continue
        profile = Profile.from_mapping(r, field_map)
        out.append(Conversation(cid, aid, profile, turns, meta={"id_with_user": True}))
    counts = {"rows": len(rows), "conversations": len({c.conversation_id for c in out}),
              "annotators": len({c.user_id for c in out}), "rows_kept": len(out)}
    return out, dropped, counts


def prepare_community_alignment(path: PathLike, out: PathLike, *, seed: int = 0, valid_fraction: float = 0.1,
                                test_fraction: float = 0.1, split_by: str = "conversation", supervise: str = "all",
                                max_turns: Optional[int] = None, encoder: Any = None,
                                encoder_device: Optional[str] = "auto", overwrite: bool = False,
                                command: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """``cuma data ca``: load, split (never by row), write ``out``; returns the manifest."""
    convs, dropped, counts = load_community_alignment(path, max_turns=max_turns)
    return prepare_preference(
        convs, out, dataset="community_alignment", dropped=dropped, seed=seed, valid_fraction=valid_fraction,
        test_fraction=test_fraction, split_by=split_by, supervise=supervise, choice_letters=CA_LETTERS,
        encoder=encoder, encoder_device=encoder_device, overwrite=overwrite, inputs={"input": path},
        options={"input": os.fspath(path), "max_turns": max_turns, "columns": dict(CA_COLUMNS),
                 "field_map": dict(COMMUNITY_ALIGNMENT_FIELD_MAP)},
        command=command, source_counts=counts,
    )
