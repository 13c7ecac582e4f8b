"""Request and response schemas of ``cuma serve``, in one place (the OpenAI wire format plus cuma's own fields).

Requests are validated strictly (JSON types are not coerced: ``"n": "2"`` is an error) and unknown top-level fields
are ignored, as OpenAI-compatible servers do. Fields whose shape is a union (``profile``, ``stop``, message
``content``) are typed loosely here and checked by the ``check_*`` functions below, so that every error names the
field and says what it should be. Every failure becomes an :class:`APIError`, which the HTTP layer turns into
``{"error": {"message", "type", "param", "code"}}`` with its status code.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..profiles import PROFILE_FIELDS, Profile, normalize_value

__all__ = [
    "APIError",
    "ChatCompletionRequest",
    "ChatMessage",
    "ChoiceRequest",
    "MAX_CHOICE_OPTIONS",
    "MAX_CHOICE_PROFILES",
    "MAX_N",
    "MAX_STOP",
    "ROLES",
    "StreamOptions",
    "check_messages",
    "check_profile",
    "check_stop",
    "chunk",
    "completion",
    "error_body",
    "new_id",
    "parse_request",
]

MAX_N = 16  # choices per chat request
MAX_STOP = 4  # stop sequences per request (OpenAI's limit)
MAX_CHOICE_OPTIONS = 26  # option letters A..Z
MAX_CHOICE_PROFILES = 64
ROLES = ("system", "developer", "user", "assistant")

# status -> OpenAI error type
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error answered to the client: HTTP ``status``, a message that names the field (``param``), an error
    ``code``, and extra response headers (``Retry-After``)."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[Mapping[str, str]] = None) -> None:
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


# ---------------------------------------------------------------------------------------------------------- requests


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class ChatMessage(_Strict):
    role: str
    content: Any = None  # a string, or a list of {"type": "text", "text": ...} parts; checked by check_messages
    name: Optional[str] = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    model: Optional[str] = None
    messages: list[ChatMessage]
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Any = None  # a string or a list of up to MAX_STOP strings; checked by check_stop
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    profile: Any = None  # an object of cuma.Profile fields or a profile sentence; checked by check_profile
    user: Optional[str] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list] = None
    response_format: Optional[dict] = None
    # extensions (the names vLLM uses): generate at least min_tokens tokens; never stop at the end-of-turn token
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False


class ChoiceRequest(_Strict):
    """``POST /v1/choice``: how would each profile answer this multiple-choice question?"""

    model: Optional[str] = None
    question: str = Field(min_length=1)
    options: list[str] = Field(min_length=2, max_length=MAX_CHOICE_OPTIONS)
    profiles: list[Any] = Field(min_length=1, max_length=MAX_CHOICE_PROFILES)


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def parse_request(model_cls: type[BaseModel], raw: bytes) -> Any:
    """Validate a JSON body into ``model_cls``; any failure is a 400 naming the first offending field."""
    try:
        return model_cls.model_validate_json(raw)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        kind = first.get("type", "")
        if kind == "json_invalid":
            detail = str(first.get("msg", "")).removeprefix("Invalid JSON: ")
            raise APIError(400, f"malformed JSON body: {detail}", code="invalid_json") from None
        param = _loc(tuple(first.get("loc", ()))) or None
        if kind == "model_type" and not param:
            raise APIError(400, "the request body must be a JSON object", code="invalid_type") from None
        msg = str(first.get("msg", "invalid value"))
        if kind == "missing":
            raise APIError(400, f"{param}: this field is required", param=param, code="missing_field") from None
        raise APIError(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value") from None


def check_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """The conversation as ``[{"role", "content"}]`` strings; ``developer`` becomes ``system``."""
    if not messages:
        raise APIError(400, "messages: the conversation is empty; send at least one message", param="messages",
                       code="empty_conversation")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if m.role not in ROLES:
            raise APIError(
                400, f"{where}.role: unknown role {m.role!r}; cuma serve accepts {', '.join(ROLES)}",
                param=f"{where}.role", code="invalid_role",
            )
        content = m.content
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(
                        400, f"{where}.content[{j}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                        "supported", param=f"{where}.content[{j}]", code="invalid_content",
                    )
                parts.append(part["text"])
            content = "".join(parts)
        if content is None and m.role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise APIError(400, f"{where}.content: must be a string or a list of text parts",
                           param=f"{where}.content", code="invalid_content")
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    if all(m["role"] == "system" for m in out):
        raise APIError(400, "messages: the conversation has no user or assistant message", param="messages",
                       code="empty_conversation")
    return out


def check_stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise APIError(400, "stop: must be a string or a list of strings", param="stop", code="invalid_type")
    if len(items) > MAX_STOP:
        raise APIError(400, f"stop: at most {MAX_STOP} stop sequences, got {len(items)}", param="stop",
                       code="invalid_value")
    if any(s == "" for s in items):
        raise APIError(400, "stop: stop sequences must not be empty", param="stop", code="invalid_value")
    return list(items)


def _check_value(value: Any, param: str) -> None:
    """One profile value as :class:`cuma.Profile` will read it (a number too large, not finite, ...): a 400 whose
    ``param`` is that field."""
    try:
        normalize_value(value, param.split(".", 1)[1] if "." in param else param)
    except ValueError as err:
        raise APIError(400, f"{param}: {err}", param=param, code="invalid_profile") from None


def check_profile(value: Any, param: str = "profile") -> Optional[tuple[str, Optional[dict]]]:
    """``(profile sentence, fields or None)`` of a request's profile, or None when none was given.

    An object is read as :class:`cuma.Profile` fields (unknown fields and wrong value types are errors naming the
    field); its sentence is :meth:`cuma.Profile.to_text`, the text the adapter saw in training. A string is taken as
    the profile sentence itself."""
    if value is None:
        return None
    if isinstance(value, str):
        text = " ".join(value.split())
        if not text:
            raise APIError(400, f"{param}: the profile sentence is empty", param=param, code="invalid_profile")
        return text, None
    if not isinstance(value, dict):
        raise APIError(400, f"{param}: must be an object of profile fields ({', '.join(PROFILE_FIELDS)}, extra) or "
                       f"a profile sentence, got {type(value).__name__}", param=param, code="invalid_profile")
    unknown = [k for k in value if k not in PROFILE_FIELDS and k != "extra"]
    if unknown:
        raise APIError(
            400, f"{param}.{unknown[0]}: unknown profile field{'s' if len(unknown) > 1 else ''} {unknown}; known "
            f"fields: {', '.join(PROFILE_FIELDS)} and extra", param=f"{param}.{unknown[0]}", code="unknown_profile_field",
        )
    for key, v in value.items():
        if key == "extra":
            if v is not None and not isinstance(v, dict):
                raise APIError(400, f"{param}.extra: must be an object of extra attributes",
                               param=f"{param}.extra", code="invalid_profile")
            for ek, ev in (v or {}).items():
                if ev is not None and (isinstance(ev, bool) or not isinstance(ev, (str, int, float))):
                    raise APIError(400, f"{param}.extra.{ek}: must be a string or a number",
                                   param=f"{param}.extra.{ek}", code="invalid_profile")
                _check_value(ev, f"{param}.extra.{ek}")
        elif v is not None and (isinstance(v, bool) or not isinstance(v, (str, int, float))):
            raise APIError(400, f"{param}.{key}: must be a string or a number, got {type(v).__name__}",
                           param=f"{param}.{key}", code="invalid_profile")
        else:
            _check_value(v, f"{param}.{key}")
    try:
        profile = Profile.from_dict(value)
    except ValueError as err:
        raise APIError(400, f"{param}: {err}", param=param, code="invalid_profile") from None
    text = profile.to_text()
    if not text:
        raise APIError(400, f"{param}: the profile has no field with a value", param=param, code="invalid_profile")
    return text, profile.to_dict()


# --------------------------------------------------------------------------------------------------------- responses


def new_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def completion(request_id: str, model: str, created: int, choices: list[dict], usage: dict) -> dict[str, Any]:
    """A ``chat.completion`` object; ``choices``: ``[{"index", "text", "finish_reason"}]``."""
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {"index": c["index"], "message": {"role": "assistant", "content": c["text"]}, "logprobs": None,
             "finish_reason": c["finish_reason"]}
            for c in choices
        ],
        "usage": usage,
    }


def chunk(request_id: str, model: str, created: int, index: Optional[int] = None, delta: Optional[dict] = None,
          finish_reason: Optional[str] = None, usage: Optional[dict] = None) -> dict[str, Any]:
    """A ``chat.completion.chunk``: one choice's delta, or (``index=None``) the closing usage chunk."""
    out: dict[str, Any] = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                           "system_fingerprint": None}
    if index is None:
        out["choices"] = []
        out["usage"] = usage
    else:
        out["choices"] = [{"index": index, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}]
    return out


def now() -> int:
    return int(time.time())
