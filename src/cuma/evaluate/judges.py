"""Pairwise judges: which of two answers better serves a user with a given profile (DESIGN decision 7).

    verdict = await judge.compare(prompt, profile_text, answer_a, answer_b)   # "A" | "B" | "tie" | None
    outcome = await judge_both_orders(judge, prompt, profile_text, candidate, reference)
    reward_fn = make_reward_fn(judge)                                       # async GRPO reward

``None`` means the judge's reply could not be parsed (or was malformed): it is counted in ``judge.stats``, never
guessed. Every pair is judged in both orders (candidate as A, then as B); if the two verdicts disagree the outcome
is a tie, and if either is ``None`` the outcome is ``"invalid"``.

Implementations:

* :class:`HTTPJudge` -- any OpenAI-compatible ``/chat/completions`` endpoint (OpenAI, a local vLLM or llama.cpp
  server), standard library only. The API key is read from an environment variable (``api_key_env``) when the
  request is sent and is never logged, stored or put into an error message. Timeouts, connection errors, 429 and
  5xx are retried with exponential backoff; other 4xx fail at once. At most ``concurrency`` requests run at a time.
  Parsed verdicts are cached on disk, keyed by a sha256 of (judge identity, prompt template version, messages).
* :class:`TransformersJudge` -- any chat model in process (the embedded SmolLM2 works offline): the logits of the
  first tokens of ``A`` / ``B`` / ``tie`` at the answer position (``mode="logits"``, always a verdict), or a few
  greedily generated tokens parsed like an HTTP reply (``mode="generate"``).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Union

from ..data.conversations import strip_think

__all__ = [
    "JUDGE_TEMPLATE_VERSION",
    "HTTPJudge",
    "Judge",
    "JudgeCache",
    "JudgeError",
    "TransformersJudge",
    "build_judge_messages",
    "judge_both_orders",
    "judge_pair",
    "make_reward_fn",
    "parse_verdict",
]

JUDGE_TEMPLATE_VERSION = "pairwise-profile-v1"
VERDICTS = ("A", "B", "tie")
OUTCOME_REWARD = {"win": 1.0, "tie": 0.5, "loss": 0.0, "invalid": 0.5}

JUDGE_SYSTEM = (
    "You are an impartial judge. You compare two assistant responses to the same conversation and decide which one "
    "better serves the specific user described by their profile: helpful, accurate, and appropriate for that "
    "person's background and values. Ignore the order in which the responses are shown and their length. "
    "Reply with exactly one token: A, B, or tie."
)


class JudgeError(RuntimeError):
    """A judge request that failed for good (after retries, or a non-retryable HTTP error)."""


# ---------------------------------------------------------------------------------------------------------- prompt


def _conversation_text(prompt: Union[str, Sequence[Mapping[str, Any]]]) -> str:
    if isinstance(prompt, str):
        return f"[user]: {prompt.strip()}"
    lines = []
    for m in prompt:
        role = str(m.get("role", "user"))
        if role == "system":
            continue
        lines.append(f"[{role}]: {str(m.get('content', '')).strip()}")
    return "\n".join(lines)


def build_judge_messages(prompt: Union[str, Sequence[Mapping[str, Any]]], profile_text: str, answer_a: str,
                         answer_b: str) -> list[dict[str, str]]:
    """The chat messages sent to a judge: a system instruction, then the profile, the conversation and A / B."""
    profile = (profile_text or "").strip() or "(no profile given)"
    user = (
        f"User profile: {profile}\n\n"
        f"Conversation:\n{_conversation_text(prompt)}\n\n"
        f"Response A:\n{(answer_a or '').strip()}\n\n"
        f"Response B:\n{(answer_b or '').strip()}\n\n"
        "Which response better serves this user, given their profile? Reply with A, B or tie only."
    )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


_LEAD = re.compile(
    r"^(?i:(?:final\s+)?(?:verdict|answer|winner|choice|decision)\s*(?:is)?\s*[:\-=]?\s*)?"
    r"(?i:(?:response|answer|assistant)\s+)?"
    r"(A|B|tie|Tie|TIE|draw|Draw|DRAW)"
    r"(?=$|[\s.,;:!)\]]*$|[.,;:!)\]]|\s*\n)",
)


def parse_verdict(text: Optional[str]) -> Optional[str]:
    """``"A"``, ``"B"`` or ``"tie"`` from a judge reply, or None when the reply does not start with one.

    Think blocks are stripped; markdown emphasis, quotes and brackets around the verdict are ignored; a short lead-in
    (``Verdict: B``, ``Answer A``) is accepted. Letters must be capitals (``"a good answer"`` is not a verdict);
    ``tie`` / ``draw`` in any case. Anything else (``"Both are fine"``, empty) is None.
    """
    if not isinstance(text, str):
        return None
    t = strip_think(text)
    t = re.sub(r"[*_`\"'\[\]()<>]", "", t).strip()
    if not t:
        return None
    m = _LEAD.match(t)
    if not m:
        low = t.lower().rstrip(".! ")
        if low in ("verdict: tie", "it's a tie", "it is a tie", "a tie"):
            return "tie"
        return None
    v = m.group(1)
    return v if v in ("A", "B") else "tie"


# ---------------------------------------------------------------------------------------------------------- cache


class JudgeCache:
    """Verdicts on disk, one small JSON file per key (``DIR/ab/abcdef....json``), written atomically."""

    def __init__(self, folder: Union[str, os.PathLike]) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(identity: Mapping[str, Any], messages: Sequence[Mapping[str, Any]]) -> str:
        text = json.dumps({"judge": dict(identity), "messages": list(messages)}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> Optional[dict]:
        p = self._path(key)
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, OSError):
            return None

    def put(self, key: str, value: Mapping[str, Any]) -> None:
        from ..runinfo import atomic_write_json

        atomic_write_json(self._path(key), dict(value))


# ---------------------------------------------------------------------------------------------------------- judges


def sends_key_in_clear(url: str) -> bool:
    """Whether a request to ``url`` would carry a bearer key unencrypted off this machine: ``http://`` to a host that
    is not a loopback name or address (``localhost``, ``127.0.0.0/8``, ``::1``)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http":
        return False
    host = (parts.hostname or "").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return True


class Judge:
    """Base class: ``await compare(prompt, profile_text, answer_a, answer_b) -> "A" | "B" | "tie" | None``."""

    name = "judge"

    def __init__(self, cache_dir: Optional[Union[str, os.PathLike]] = None) -> None:
        self.cache = JudgeCache(cache_dir) if cache_dir else None
        self.stats: Counter = Counter()
        self._stats_lock = threading.Lock()

    def identity(self) -> dict[str, Any]:
        return {"type": self.name, "template": JUDGE_TEMPLATE_VERSION}

    def count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[key] += n

    async def compare(self, prompt, profile_text: str, answer_a: str, answer_b: str) -> Optional[str]:
        messages = build_judge_messages(prompt, profile_text, answer_a, answer_b)
        key = JudgeCache.key(self.identity(), messages) if self.cache is not None else None
        if key is not None:
            hit = self.cache.get(key)
            if hit is not None and hit.get("verdict") in VERDICTS:
                self.count("cache_hits")
                return hit["verdict"]
        reply = await self._reply(messages)
        self.count("judged")
        verdict = reply if reply in VERDICTS and self._direct_verdicts else parse_verdict(reply)
        if verdict is None:
            self.count("unparseable")
            return None
        self.count(f"verdict_{verdict}")
        if key is not None:
            self.cache.put(key, {"verdict": verdict, "reply": reply, "judge": self.identity()})
        return verdict

    _direct_verdicts = False

    async def _reply(self, messages: list[dict[str, str]]) -> Optional[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {**self.identity(), "stats": dict(self.stats)}

    def close(self) -> None:
        pass


class HTTPJudge(Judge):
    """OpenAI-compatible chat-completions judge (see the module docstring)."""

    name = "http"

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: Optional[str] = "OPENAI_API_KEY",
        timeout: float = 60.0,
        max_retries: int = 4,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        concurrency: int = 4,
        cache_dir: Optional[Union[str, os.PathLike]] = None,
        temperature: float = 0.0,
        max_tokens: int = 8,
        extra_body: Optional[Mapping[str, Any]] = None,
    ) -> None:
        super().__init__(cache_dir)
        if not base_url or not str(base_url).startswith(("http://", "https://")):
            raise ValueError(f"judge base URL must start with http:// or https://, got {base_url!r}")
        if not model:
            raise ValueError("the HTTP judge needs a model name")
        if concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise ValueError("concurrency must be >= 1, max_retries >= 0 and timeout > 0")
        url = str(base_url).rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.concurrency = int(concurrency)
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)
        self.extra_body = dict(extra_body or {})
        self._executor = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="cuma-judge")
        self._warned_plain_http = False
        if self.api_key_env and os.environ.get(self.api_key_env):
            self._warn_plain_http()

    def __repr__(self) -> str:  # never shows the key
        return f"HTTPJudge(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def identity(self) -> dict[str, Any]:
        return {"type": "http", "url": self.url, "model": self.model, "template": JUDGE_TEMPLATE_VERSION,
                "temperature": self.temperature, "max_tokens": self.max_tokens, "extra_body": self.extra_body}

    def describe(self) -> dict[str, Any]:
        return {**self.identity(), "api_key_env": self.api_key_env, "timeout": self.timeout,
                "max_retries": self.max_retries, "concurrency": self.concurrency, "stats": dict(self.stats)}

    async def _reply(self, messages: list[dict[str, str]]) -> Optional[str]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._request, messages)

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            self._warn_plain_http()
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _warn_plain_http(self) -> None:
        """Once per judge: the API key is about to travel unencrypted to a host other than this machine."""
        if self._warned_plain_http or not sends_key_in_clear(self.url):
            return
        self._warned_plain_http = True
        warnings.warn(
            f"the judge sends the API key from ${self.api_key_env} as a bearer token over plain http:// to "
            f"{urllib.parse.urlsplit(self.url).hostname}, which is not this machine: anyone on the network path can "
            "read it. Use an https:// URL, or unset the variable for a server that needs no key.",
            stacklevel=3,
        )

    def _sleep(self, attempt: int) -> None:
        time.sleep(min(self.max_backoff, self.backoff * (2 ** attempt)))

    def _request(self, messages: list[dict[str, str]]) -> Optional[str]:
        """One reply text (None when the response body is malformed); raises JudgeError when it fails for good."""
        body = {"model": self.model, "messages": messages, "temperature": self.temperature,
                "max_tokens": self.max_tokens, **self.extra_body}
        data = json.dumps(body).encode("utf-8")
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.count("retries")
                self._sleep(attempt - 1)
            self.count("requests")
            req = urllib.request.Request(self.url, data=data, headers=self._headers(), method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as err:
                code = err.code
                try:
                    detail = err.read(300).decode("utf-8", "replace")
                except Exception:  # noqa: BLE001
                    detail = ""
                if code == 429 or code >= 500:
                    last = f"HTTP {code}"
                    self.count(f"http_{code}")
                    continue
                raise JudgeError(f"judge {self.url} answered HTTP {code}: {detail.strip()[:300]}") from None
            except (socket.timeout, TimeoutError) as err:
                last = f"timeout after {self.timeout}s ({type(err).__name__})"
                self.count("timeouts")
                continue
            except urllib.error.URLError as err:
                reason = err.reason
                if isinstance(reason, (socket.timeout, TimeoutError)):
                    last = f"timeout after {self.timeout}s"
                    self.count("timeouts")
                else:
                    last = f"connection error: {reason}"
                    self.count("connection_errors")
                continue
            except (ConnectionError, OSError) as err:
                last = f"connection error: {type(err).__name__}"
                self.count("connection_errors")
                continue
            try:
                payload = json.loads(raw.decode("utf-8"))
                content = payload["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                self.count("malformed")
                return None
            if not isinstance(content, str):
                self.count("malformed")
                return None
            return content
        self.count("failed")
        raise JudgeError(f"judge {self.url} failed after {self.max_retries + 1} attempts: {last}")

    def close(self) -> None:
        self._executor.shutdown(wait=False)


class TransformersJudge(Judge):
    """In-process judge on any chat model (see the module docstring). Calls run one at a time."""

    name = "transformers"

    def __init__(self, model, tokenizer, *, mode: str = "logits", max_new_tokens: int = 4,
                 cache_dir: Optional[Union[str, os.PathLike]] = None, model_name: Optional[str] = None) -> None:
        super().__init__(cache_dir)
        if mode not in ("logits", "generate"):
            raise ValueError(f"mode must be 'logits' or 'generate', got {mode!r}")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the judge tokenizer needs a chat_template")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.mode = mode
        self.max_new_tokens = int(max_new_tokens)
        self.model_name = model_name or getattr(getattr(model, "config", None), "_name_or_path", "") or "model"
        self._lock = threading.Lock()
        self._direct_verdicts = mode == "logits"
        self._label_ids: Optional[list[int]] = None

    def identity(self) -> dict[str, Any]:
        return {"type": "transformers", "model": str(self.model_name), "mode": self.mode,
                "template": JUDGE_TEMPLATE_VERSION}

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def label_token_ids(self, prefix: str) -> list[int]:
        """First token of each of ``A``, ``B``, ``tie`` after ``prefix`` (distinct, else ValueError)."""
        base = self._encode(prefix)
        ids = []
        for label in VERDICTS:
            full = self._encode(prefix + label)
            if full[: len(base)] != base or len(full) <= len(base):
                raise ValueError(f"judge label {label!r} does not extend the prompt's tokens")
            ids.append(int(full[len(base)]))
        if len(set(ids)) != len(ids):
            raise ValueError(f"judge labels {VERDICTS} share a first token ({ids}); use mode='generate'")
        return ids

    def _prompt(self, messages) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    async def _reply(self, messages):
        return await asyncio.to_thread(self._reply_sync, messages)

    def _reply_sync(self, messages) -> Optional[str]:
        import torch

        text = self._prompt(messages)
        with self._lock, torch.no_grad():
            device = next(self.model.parameters()).device
            ids = torch.tensor([self._encode(text)], device=device)
            if self.mode == "logits":
                if self._label_ids is None:
                    self._label_ids = self.label_token_ids(self._prompt(build_judge_messages("q", "", "a", "b")))
                logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
                sel = logits[torch.tensor(self._label_ids, device=logits.device)].float()
                if not torch.isfinite(sel).all():
                    return None
                return VERDICTS[int(sel.argmax())]
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=self.max_new_tokens, pad_token_id=pad)
            return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------------------- pairs


async def judge_pair(judge: Judge, prompt, profile_text: str, candidate: str, reference: str) -> dict[str, Any]:
    """Both orders: ``{"verdict_candidate_first", "verdict_candidate_second", "outcome", "consistent"}``.

    First call: A = candidate, B = reference; second: A = reference, B = candidate. Each verdict is mapped to the
    candidate's view (win / loss / tie); equal views give that outcome, different ones a tie (``consistent: False``),
    and a None verdict the outcome ``"invalid"``."""
    first, second = await asyncio.gather(
        judge.compare(prompt, profile_text, candidate, reference),
        judge.compare(prompt, profile_text, reference, candidate),
    )
    view1 = {"A": "win", "B": "loss", "tie": "tie"}.get(first) if first else None
    view2 = {"A": "loss", "B": "win", "tie": "tie"}.get(second) if second else None
    if view1 is None or view2 is None:
        outcome, consistent = "invalid", None
    elif view1 == view2:
        outcome, consistent = view1, True
    else:
        outcome, consistent = "tie", False
    return {"verdict_candidate_first": first, "verdict_candidate_second": second, "outcome": outcome,
            "consistent": consistent}


async def judge_both_orders(judge: Judge, prompt, profile_text: str, candidate: str, reference: str) -> str:
    """``"win" | "tie" | "loss" | "invalid"`` for the candidate (see :func:`judge_pair`)."""
    return (await judge_pair(judge, prompt, profile_text, candidate, reference))["outcome"]


def _completion_text(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], Mapping):
        return str(completion[-1].get("content", ""))
    if isinstance(completion, Mapping):
        return str(completion.get("content", ""))
    return str(completion)


def make_reward_fn(judge: Judge, strip_thinking: bool = True):
    """Async GRPO reward: ``(prompts, completions, reference=[...], profile_text=[...], **kw) -> list[float]``.

    win 1, tie 0.5, loss 0; an invalid outcome (unparseable verdict) gets the neutral 0.5 and is counted in
    ``judge.stats["reward_invalid"]``. ``reference`` (the dataset's chosen response per row) is required."""

    async def judge_reward(prompts, completions, reference=None, profile_text=None, **kwargs) -> list[float]:
        if reference is None:
            raise ValueError("the judge reward needs a 'reference' column (the chosen response of each prompt)")
        n = len(completions)
        if len(reference) != n or len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts, {n} completions and {len(reference)} references differ")
        profiles = list(profile_text) if profile_text is not None else [""] * n
        tasks = []
        for p, c, r, prof in zip(prompts, completions, reference, profiles):
            text = _completion_text(c)
            tasks.append(judge_both_orders(judge, p, prof or "", strip_think(text) if strip_thinking else text,
                                           _completion_text(r)))
        outcomes = await asyncio.gather(*tasks)
        for o in outcomes:
            if o == "invalid":
                judge.count("reward_invalid")
        return [OUTCOME_REWARD[o] for o in outcomes]

    judge_reward.__name__ = "judge_reward"
    return judge_reward
