"""PRISM (Kirk et al. 2024): ``survey`` (one row per user) + ``conversations`` (one row per conversation) ->
prepared preference folder (``cuma data prism``).

Each conversation's ``conversation_history`` is a list of utterances ``{"turn", "role": "user"|"model", "content",
"model_provider", "model_name", "score", "if_chosen", "within_turn_id"}``. Per turn there is one user utterance
and several scored model responses, one with ``if_chosen: true``; only the chosen reply continues the conversation.
The thread is followed turn by turn and stops at the first turn that cannot be used (no user message, no response,
no or several chosen responses); the turns after it are dropped and counted. Conversations whose user is missing
from the survey, that are empty or whose first turn is unusable are dropped and counted.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

from ..profiles import PRISM_FIELD_MAP, Profile
from .conversations import (
    Conversation,
    Dropped,
    Turn,
    check_max_turns,
    load_table,
    maybe_json,
    prepare_preference,
    require_columns,
    text_of,
)

__all__ = ["PRISM_CONVERSATION_COLUMNS", "PRISM_SURVEY_COLUMNS", "load_prism", "prepare_prism"]

PathLike = Union[str, os.PathLike]

# column names of the raw PRISM files (adapt here if a mirror renames them)
USER_ID = "user_id"
CONVERSATION_ID = "conversation_id"
HISTORY = "conversation_history"
CONVERSATION_TYPE = "conversation_type"
PRISM_SURVEY_COLUMNS = (USER_ID,)
PRISM_CONVERSATION_COLUMNS = (CONVERSATION_ID, USER_ID, HISTORY)
# utterance keys
U_TURN, U_ROLE, U_CONTENT, U_CHOSEN, U_SCORE = "turn", "role", "content", "if_chosen", "score"
U_MODEL, U_PROVIDER, U_WITHIN = "model_name", "model_provider", "within_turn_id"
USER_ROLES = ("user", "human")
MODEL_ROLES = ("model", "assistant")


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value) if value is not None else False


def _turn_index(value: Any) -> Optional[int]:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def parse_history(history: Any, dropped: Dropped) -> list[Turn]:
    """The usable turns of one ``conversation_history`` along the chosen thread (see the module docstring)."""
    history = maybe_json(history)
    if not isinstance(history, Sequence) or isinstance(history, str):
        dropped.add("conversations", "conversation_history is not a list")
        return []
    by_turn: dict[int, dict[str, list]] = {}
    for u in history:
        u = maybe_json(u)
        if not isinstance(u, Mapping):
            dropped.add("utterances", "utterance is not an object")
            continue
        ti = _turn_index(u.get(U_TURN))
        role = str(u.get(U_ROLE) or "").strip().lower()
        if ti is None:
            dropped.add("utterances", "utterance without a turn number")
            continue
        slot = by_turn.setdefault(ti, {"user": [], "model": []})
        if role in USER_ROLES:
            slot["user"].append(u)
        elif role in MODEL_ROLES:
            slot["model"].append(u)
        else:
            dropped.add("utterances", f"unknown role {role!r}")
    turns: list[Turn] = []
    order = sorted(by_turn)
    for k, ti in enumerate(order):
        slot = by_turn[ti]
        reason = None
        user_texts = [text_of(u.get(U_CONTENT)) for u in slot["user"]]
        user_texts = [t for t in user_texts if t]
        models = sorted(slot["model"], key=lambda u: (_turn_index(u.get(U_WITHIN)) is None, _turn_index(u.get(U_WITHIN)) or 0))
        responses = [text_of(u.get(U_CONTENT)) or "" for u in models]
        chosen = [i for i, u in enumerate(models) if _truthy(u.get(U_CHOSEN))]
        if ti != k:
            reason = "turn numbers not consecutive"
        elif len(user_texts) != 1:
            reason = "turn without exactly one user message"
        elif not models:
            reason = "turn without model responses"
        elif not chosen:
            reason = "turn without a chosen response"
        elif len(chosen) > 1:
            reason = "turn with several chosen responses"
        elif not responses[chosen[0]]:
            reason = "chosen response is empty"
        if reason is not None:
            dropped.add("turns", reason)
            if len(order) - k - 1:
                dropped.add("turns", "after an unusable turn (thread cut)", len(order) - k - 1)
            break
        meta = [{"model_name": u.get(U_MODEL), "model_provider": u.get(U_PROVIDER), "score": u.get(U_SCORE)}
                for u in models]
        turns.append(Turn(user=user_texts[0], responses=responses, chosen=chosen[0], meta=meta))
    return turns


def load_prism(survey: PathLike, conversations: PathLike, field_map: Mapping[str, str] = PRISM_FIELD_MAP,
               max_turns: Optional[int] = None) -> tuple[list[Conversation], Dropped, dict[str, Any]]:
    """Conversations (with profiles) of PRISM, what was dropped, and source counts."""
    max_turns = check_max_turns(max_turns)
    dropped = Dropped()
    srows = load_table(survey)
    require_columns(srows, PRISM_SURVEY_COLUMNS, f"PRISM survey {survey}")
    crows = load_table(conversations)
    require_columns(crows, PRISM_CONVERSATION_COLUMNS, f"PRISM conversations {conversations}")
    users: dict[str, Profile] = {}
    for r in srows:
        uid = text_of(r.get(USER_ID))
        if uid is None:
            dropped.add("survey", "row without user_id")
            continue
        if uid in users:
            raise ValueError(f"PRISM survey {survey}: user_id {uid!r} occurs more than once")
        users[uid] = Profile.from_mapping({k: maybe_json(v) for k, v in r.items()}, field_map)
    out: list[Conversation] = []
    seen: set[str] = set()
    for r in crows:
        cid, uid = text_of(r.get(CONVERSATION_ID)), text_of(r.get(USER_ID))
        if cid is None:
            dropped.add("conversations", "row without conversation_id")
            continue
        if cid in seen:
            dropped.add("conversations", "duplicate conversation_id")
            continue
        seen.add(cid)
        if uid is None:
            dropped.add("conversations", "row without user_id")
            continue
        if uid not in users:
            dropped.add("conversations", "user missing from the survey")
            continue
        history = r.get(HISTORY)
        if history is None or (isinstance(history, (list, tuple)) and not history):
            dropped.add("conversations", "empty conversation")
            continue
        turns = parse_history(history, dropped)
        if not turns:
            dropped.add("conversations", "no usable first turn")
            continue
        if max_turns is not None and len(turns) > max_turns:
            dropped.add("turns", f"beyond --max-turns {max_turns}", len(turns) - max_turns)
            turns = turns[:max_turns]
        out.append(Conversation(cid, uid, users[uid], turns,
                                meta={"conversation_type": r.get(CONVERSATION_TYPE)}))
    counts = {"survey_users": len(users), "conversation_rows": len(crows), "conversations_kept": len(out)}
    return out, dropped, counts


def prepare_prism(survey: PathLike, conversations: PathLike, out: PathLike, *, seed: int = 0,
                  valid_fraction: float = 0.1, test_fraction: float = 0.1, split_by: str = "conversation",
                  supervise: str = "all", max_turns: Optional[int] = None, encoder: Any = None,
                  encoder_device: Optional[str] = "auto", overwrite: bool = False,
                  command: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """``cuma data prism``: load, split, write ``out``; returns the manifest."""
    convs, dropped, counts = load_prism(survey, conversations, max_turns=max_turns)
    return prepare_preference(
        convs, out, dataset="prism", dropped=dropped, seed=seed, valid_fraction=valid_fraction,
        test_fraction=test_fraction, split_by=split_by, supervise=supervise, choice_letters=None,
        encoder=encoder, encoder_device=encoder_device, overwrite=overwrite,
        inputs={"survey": survey, "conversations": conversations},
        options={"survey": os.fspath(survey), "conversations": os.fspath(conversations), "max_turns": max_turns,
                 "field_map": dict(PRISM_FIELD_MAP)},
        command=command, source_counts=counts,
    )
