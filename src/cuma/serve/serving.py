"""From a validated request to engine work and back: checks that need the model (profile required, context length,
limits), prompt building, and the two ways a chat answer goes out (one JSON object, or server-sent events in the
OpenAI chunk format ending with ``data: [DONE]``). A client that goes away mid-request has its sequences cancelled,
which frees their rows in the running batch."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Optional

from .engine import ChoiceJob, Engine, EngineUnavailable, GenRequest, QueueFull, SamplingParams
from .protocol import (
    APIError,
    ChatCompletionRequest,
    ChoiceRequest,
    check_messages,
    check_profile,
    check_stop,
    chunk,
    completion,
    error_body,
    new_id,
    now,
)

logger = logging.getLogger("cuma.serve")

__all__ = ["Limits", "run_chat", "run_choice"]

_POLL_S = 0.5  # how often a waiting handler checks that its client is still there


class Limits:
    def __init__(self, max_tokens_limit: int = 512, max_body_bytes: int = 1 << 20) -> None:
        if max_tokens_limit < 1:
            raise ValueError(f"--max-tokens-limit must be >= 1, got {max_tokens_limit}")
        if max_body_bytes < 1024:
            raise ValueError(f"--max-body-bytes must be >= 1024, got {max_body_bytes}")
        self.max_tokens_limit = int(max_tokens_limit)
        self.max_body_bytes = int(max_body_bytes)


def _profile_missing(served) -> APIError:
    return APIError(
        400,
        f"profile: this model (method {served.method!r}) routes on the user's profile and needs one: send "
        "\"profile\": {\"country\": ..., \"age_group\": ...} or a profile sentence (with the openai client: "
        "extra_body={\"profile\": {...}})",
        param="profile",
        code="profile_required",
    )


def _unsupported(req: ChatCompletionRequest) -> None:
    if req.logprobs:
        raise APIError(400, "logprobs: not supported by cuma serve", param="logprobs", code="unsupported")
    if req.tools:
        raise APIError(400, "tools: tool calls are not supported by cuma serve", param="tools", code="unsupported")
    if req.response_format and req.response_format.get("type") not in (None, "text"):
        raise APIError(400, "response_format: only {\"type\": \"text\"} is supported", param="response_format",
                       code="unsupported")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        if value not in (None, 0, 0.0):
            raise APIError(400, f"{name}: not supported by cuma serve (send 0 or leave it out)", param=name,
                           code="unsupported")


def prepare_chat(served, req: ChatCompletionRequest, limits: Limits) -> tuple[list[int], SamplingParams, Optional[str]]:
    """(prompt token ids, sampling parameters, profile sentence) of a chat request, or an APIError."""
    _unsupported(req)
    messages = check_messages(req.messages)
    stop = check_stop(req.stop)
    profile = check_profile(req.profile)
    profile_text = profile[0] if profile else None
    if served.uses_profile and profile_text is None:
        raise _profile_missing(served)
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is not None and not 1 <= max_tokens <= limits.max_tokens_limit:
        raise APIError(400, f"{name}: must be between 1 and {limits.max_tokens_limit} (--max-tokens-limit), got "
                       f"{max_tokens}", param=name, code="invalid_value")
    try:
        prompt = served.chat_prompt_ids(messages, profile_text)
    except APIError:
        raise
    except Exception as err:  # noqa: BLE001 - a chat template that refuses the conversation (roles must alternate, ...)
        raise APIError(400, f"messages: the model's chat template refused this conversation: {err}",
                       param="messages", code="invalid_conversation") from None
    ctx = served.context_length
    if not prompt:
        raise APIError(400, "messages: the chat template rendered an empty prompt", param="messages",
                       code="invalid_conversation")
    if len(prompt) >= ctx:
        raise APIError(400, f"messages: the prompt is {len(prompt)} tokens but the model's context is {ctx} tokens",
                       param="messages", code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(limits.max_tokens_limit, ctx - len(prompt))
    elif len(prompt) + max_tokens > ctx:
        raise APIError(400, f"{name}: the prompt ({len(prompt)} tokens) plus {name}={max_tokens} exceeds the "
                       f"model's context of {ctx} tokens", param=name, code="context_length_exceeded")
    if req.min_tokens > max_tokens:
        raise APIError(400, f"min_tokens: {req.min_tokens} is more than the {max_tokens} tokens this request may "
                       "generate", param="min_tokens", code="invalid_value")
    params = SamplingParams(
        max_tokens=int(max_tokens),
        temperature=1.0 if req.temperature is None else float(req.temperature),
        top_p=1.0 if req.top_p is None else float(req.top_p),
        seed=req.seed,
        stop=tuple(stop),
        min_tokens=int(req.min_tokens),
        ignore_eos=bool(req.ignore_eos),
    )
    return prompt, params, profile_text


def _engine_error(err: Exception) -> APIError:
    if isinstance(err, QueueFull):
        return APIError(429, str(err), code="queue_full", headers={"Retry-After": str(err.retry_after)})
    return APIError(503, str(err) or "the engine is not running", code="unavailable", headers={"Retry-After": "5"})


def _sink(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
    def sink(event: tuple) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed (shutdown)
            pass

    return sink


class _Watch:
    """Waits for a request's next engine event while checking, every ``_POLL_S`` at most, that its client is still
    connected (also while events keep coming)."""

    def __init__(self, queue: asyncio.Queue, request) -> None:
        self.queue = queue
        self.request = request
        self.checked = time.monotonic()

    async def _gone(self) -> bool:
        self.checked = time.monotonic()
        return bool(await self.request.is_disconnected())

    async def next(self) -> Optional[tuple]:
        """The next event, or None when the client has disconnected."""
        while True:
            if time.monotonic() - self.checked >= _POLL_S and await self._gone():
                return None
            try:
                return await asyncio.wait_for(self.queue.get(), timeout=_POLL_S)
            except asyncio.TimeoutError:
                if await self._gone():
                    return None


def _sse(payload: Any) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode("utf-8")


async def run_chat(served, engine: Engine, req: ChatCompletionRequest, limits: Limits, request) -> Any:
    """A dict (the completion) or an async iterator of SSE bytes (``stream=True``); raises APIError."""
    prompt, params, profile_text = prepare_chat(served, req, limits)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    rid = new_id()
    gen = GenRequest(request_id=rid, prompt_ids=prompt, params=params, sink=_sink(loop, queue),
                     profile_text=profile_text, n=req.n)
    try:
        engine.submit(gen)
    except (QueueFull, EngineUnavailable) as err:
        raise _engine_error(err) from None
    created = now()
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _stream(engine, gen, queue, request, served.name, created, len(prompt), include_usage)
    texts = [[] for _ in range(req.n)]
    finish: list[Optional[str]] = [None] * req.n
    tokens = 0
    watch = _Watch(queue, request)
    try:
        while any(f is None for f in finish):
            ev = await watch.next()
            if ev is None:
                engine.cancel(rid)
                return None
            if ev[0] == "delta":
                texts[ev[1]].append(ev[2])
            elif ev[0] == "finish":
                finish[ev[1]] = ev[2]
                tokens += ev[3]
            else:
                raise APIError(ev[1], ev[2], code="engine_error")
    except asyncio.CancelledError:
        engine.cancel(rid)
        raise
    choices = [{"index": i, "text": "".join(t), "finish_reason": f} for i, (t, f) in enumerate(zip(texts, finish))]
    usage = {"prompt_tokens": len(prompt), "completion_tokens": tokens, "total_tokens": len(prompt) + tokens}
    return completion(rid, served.name, created, choices, usage)


async def _stream(engine: Engine, gen: GenRequest, queue: asyncio.Queue, request, model: str, created: int,
                  prompt_tokens: int, include_usage: bool) -> AsyncIterator[bytes]:
    rid = gen.request_id
    done = 0
    tokens = 0
    watch = _Watch(queue, request)
    try:
        for i in range(gen.n):
            yield _sse(chunk(rid, model, created, i, {"role": "assistant", "content": ""}))
        while done < gen.n:
            ev = await watch.next()
            if ev is None:
                return
            if ev[0] == "delta":
                yield _sse(chunk(rid, model, created, ev[1], {"content": ev[2]}))
            elif ev[0] == "finish":
                done += 1
                tokens += ev[3]
                yield _sse(chunk(rid, model, created, ev[1], {}, finish_reason=ev[2]))
            else:
                done = gen.n
                yield _sse(error_body(ev[1], ev[2], code="engine_error"))
                yield _sse("[DONE]")
                return
        if include_usage:
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": tokens,
                     "total_tokens": prompt_tokens + tokens}
            yield _sse(chunk(rid, model, created, None, usage=usage))
        yield _sse("[DONE]")
    finally:
        if done < gen.n:  # the client went away (or the stream was closed): free the rows
            engine.cancel(rid)


async def run_choice(served, engine: Engine, req: ChoiceRequest, request) -> Optional[dict]:
    question = req.question.strip()
    if not question:
        raise APIError(400, "question: must not be empty", param="question", code="invalid_value")
    options = []
    for i, opt in enumerate(req.options):
        text = " ".join(opt.split())
        if not text:
            raise APIError(400, f"options[{i}]: must not be empty", param=f"options[{i}]", code="invalid_value")
        options.append(text)
    parsed = []
    for i, value in enumerate(req.profiles):
        p = check_profile(value, f"profiles[{i}]")
        if p is None and served.uses_profile:
            err = _profile_missing(served)
            raise APIError(400, f"profiles[{i}]: {err.message.split(': ', 1)[1]}", param=f"profiles[{i}]",
                           code="profile_required")
        parsed.append(p)
    texts = [p[0] if p else None for p in parsed]
    try:
        prompts, letter_ids, letters = served.choice_prompts(question, options, [t or "" for t in texts])
    except ValueError as err:
        raise APIError(400, f"options: {err}", param="options", code="invalid_value") from None
    lengths = [len(served.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    if max(lengths) >= served.context_length:
        raise APIError(400, f"question: the prompt is {max(lengths)} tokens but the model's context is "
                       f"{served.context_length} tokens", param="question", code="context_length_exceeded")
    loop = asyncio.get_running_loop()
    fut: asyncio.Future = loop.create_future()

    def done(result: Any) -> None:
        def settle() -> None:
            if not fut.done():
                fut.set_result(result)

        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:
            pass

    rid = new_id("choice")
    job = ChoiceJob(request_id=rid, prompts=prompts, letter_ids=letter_ids, profile_texts=texts, done=done)
    try:
        engine.submit_choice(job)
    except (QueueFull, EngineUnavailable) as err:
        raise _engine_error(err) from None
    try:
        while True:
            finished, _ = await asyncio.wait({fut}, timeout=_POLL_S)
            if finished:
                break
            if await request.is_disconnected():
                engine.cancel(rid)
                return None
    except asyncio.CancelledError:
        engine.cancel(rid)
        raise
    result = fut.result()
    if isinstance(result, EngineUnavailable):
        raise APIError(503, str(result), code="unavailable", headers={"Retry-After": "5"})
    if isinstance(result, Exception):
        raise APIError(500, f"choice scoring failed ({type(result).__name__})", code="engine_error")
    results = []
    for value, p, probs in zip(req.profiles, parsed, result):
        k = max(range(len(probs)), key=lambda j: (probs[j], -j))
        results.append({
            "profile": (p[1] if p and p[1] is not None else value),
            "profile_text": p[0] if p else None,
            "probabilities": probs,
            "answer": options[k],
            "answer_index": k,
            "letter": letters[k],
        })
    return {"id": rid, "object": "choice", "created": now(), "model": served.name, "question": question,
            "options": options, "letters": letters, "results": results,
            "usage": {"prompt_tokens": sum(lengths)}}
