"""The serving engine: one worker thread owns the model and runs every forward; the HTTP layer only submits work
and reads events.

**Continuous batching of mixed profiles.** Waiting sequences are admitted into the running batch between decode
steps, up to ``max_batch_size`` rows. When the engine is idle, the first arrival waits at most ``max_wait_ms`` for
others to join it. New sequences are prefilled together (left padding, position ids from the mask, logits of the last
position only), then their KV cache is merged into the running batch's: the shorter side is left-padded in the time
dimension with masked zeros, so every row keeps its own positions. Each decode step feeds one token per row with the
KV cache, and a CuMA adapter gets ``profile_embeds`` with exactly one row per row of that forward, each row its own
request's profile. A row that finishes (end-of-turn token, stop sequence, its own ``max_tokens``) or whose client went
away leaves the batch at once, and cache columns that only padding still uses are cut off.

**Per-row sampling.** Temperature 0 is greedy (argmax); otherwise temperature and top-p with a per-row
``torch.Generator`` seeded from the request's ``seed`` (+ the choice index), so a seeded request gives the same
tokens whatever else shares its batch. Logits are computed in the model's dtype and sampled in float32 on the CPU. A
temperature too small for float32 (below ~1.2e-38) acts as greedy, and top-p always keeps the likeliest token. A row
whose sampling or decoding still fails ends alone: its request gets an error event and leaves the batch; the other
rows go on.

**Drain.** :meth:`Engine.begin_drain` refuses new work (:class:`EngineUnavailable`) while the running and waiting
rows go on; :meth:`Engine.wait_idle` waits for them; :meth:`Engine.stop` ends what is left with an error event.

**Choice scoring** (``/v1/choice``) runs in the same worker between decode steps, through
:func:`cuma.evaluate.scoring.score_prompts` -- the function ``cuma eval wvb`` scores with.

Events go back to the submitter through its ``sink`` callable (called from the worker thread):
``("delta", index, text)``, ``("finish", index, finish_reason, completion_tokens, token_ids)`` and
``("error", status, message)``.
"""

from __future__ import annotations

import inspect
import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

logger = logging.getLogger("cuma.serve")

__all__ = ["ChoiceJob", "Engine", "EngineUnavailable", "GenRequest", "QueueFull", "SamplingParams"]

Sink = Callable[[tuple], None]
_TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32: smaller temperatures decode greedily


class QueueFull(Exception):
    """The waiting queue is full; ``retry_after`` is a hint in seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineUnavailable(Exception):
    """The engine is stopping or its worker is gone."""


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False


@dataclass
class GenRequest:
    """One chat request: ``n`` sequences sharing a prompt and a profile. ``sink`` receives its events."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sink: Sink
    profile_text: Optional[str] = None
    n: int = 1
    arrival: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    finished: int = 0


@dataclass
class ChoiceJob:
    """Score ``prompts`` (one per profile) over ``letter_ids``; ``done(result_or_exception)`` is called once."""

    request_id: str
    prompts: list[str]
    letter_ids: list[int]
    profile_texts: list[Optional[str]]
    done: Callable[[Any], None]
    cancelled: bool = False


class _Seq:
    __slots__ = ("req", "index", "generator", "output_ids", "text", "emitted", "generated", "finish_reason")

    def __init__(self, req: GenRequest, index: int) -> None:
        self.req = req
        self.index = index
        seed = req.params.seed
        g = torch.Generator()
        g.manual_seed((seed + index) % (2**63) if seed is not None else random.getrandbits(63))
        self.generator = g
        self.output_ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.generated = 0
        self.finish_reason: Optional[str] = None


class _Batch:
    """The running rows: their KV cache, attention mask (rows x cached columns), next position, last token and
    profile rows (None for methods without profile routing)."""

    def __init__(self, seqs, cache, mask, next_pos, last_tok, profiles) -> None:
        self.seqs: list[_Seq] = seqs
        self.cache = cache
        self.mask: torch.Tensor = mask
        self.next_pos: torch.Tensor = next_pos
        self.last_tok: torch.Tensor = last_tok
        self.profiles: Optional[torch.Tensor] = profiles

    def __len__(self) -> int:
        return len(self.seqs)


def _cache_layers(cache) -> Optional[list]:
    """The per-layer key/value holders of a DynamicCache, or None when the cache is of another kind (then the
    engine cannot merge or shrink it and falls back to one batch at a time)."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return None
    for layer in layers:
        if type(layer).__name__ != "DynamicLayer" or not isinstance(getattr(layer, "keys", None), torch.Tensor):
            return None
    return list(layers)


def _left_pad(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    extra = length - x.shape[dim]
    if extra <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x.new_zeros(shape), x], dim=dim)


class Engine:
    """The worker that owns the model (see the module docstring)."""

    def __init__(self, served, *, max_batch_size: int = 16, max_wait_ms: float = 10.0, max_queue: int = 256,
                 decode_hook: Optional[Callable[[int], None]] = None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"--max-batch-size must be >= 1, got {max_batch_size}")
        if max_queue < 1:
            raise ValueError(f"--max-queue must be >= 1, got {max_queue}")
        if max_wait_ms < 0:
            raise ValueError(f"--max-wait-ms must be >= 0, got {max_wait_ms}")
        self.served = served
        self.model = served.model
        self.tokenizer = served.worker_tokenizer
        self.max_batch_size = int(max_batch_size)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.max_queue = int(max_queue)
        self._decode_hook = decode_hook
        self._cv = threading.Condition()
        self._waiting: deque[_Seq] = deque()
        self._choices: deque[ChoiceJob] = deque()
        self._cancels: set[str] = set()
        self._batch: Optional[_Batch] = None
        self._mergeable = True
        self._stopping = False
        self._draining = False
        self._working = False  # the worker holds work it took from the queues (set and read under the lock)
        self._stop_lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._eos = list(served.eos_ids)
        self._device = served.device
        params = inspect.signature(type(self.model.get_base_model() if hasattr(self.model, "get_base_model")
                                        else self.model).forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = "logits_to_keep" in params
        self.counters = {"requests": 0, "choice_requests": 0, "sequences": 0, "completed": 0, "cancelled": 0,
                         "errors": 0, "rejected": 0, "prompt_tokens": 0, "generated_tokens": 0, "steps": 0,
                         "prefills": 0, "max_batch_seen": 0}

    # ------------------------------------------------------------------------------------------------------ control

    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cuma-serve-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._stop_lock:  # a second signal may stop the engine while the drain thread does
            told = set()
            running = list(self._batch.seqs) if self._batch is not None else []
            for seq in running + list(self._waiting):
                if id(seq.req) not in told and seq.finish_reason is None and not seq.req.cancelled:
                    told.add(id(seq.req))
                    self._send(seq.req, ("error", 503, "the server is shutting down"))
                    seq.req.cancelled = True  # told once, also when stop() is called again
            self._waiting.clear()
            self._batch = None
            for job in list(self._choices):
                if not job.cancelled:
                    job.done(EngineUnavailable("the server is shutting down"))
            self._choices.clear()

    def begin_drain(self) -> None:
        """Refuse new requests from now on; what is running or waiting goes on (see :meth:`wait_idle`)."""
        with self._cv:
            self._draining = True
            self._cv.notify_all()

    @property
    def idle(self) -> bool:
        """Nothing running, waiting or being admitted (work the worker took from a queue counts until it is done)."""
        with self._cv:
            return not self._working and self._batch is None and not self._waiting and not self._choices

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every running and waiting row to finish; True when they did."""
        deadline = time.monotonic() + max(0.0, timeout)
        while not self.idle:
            if time.monotonic() >= deadline or not (self._thread is not None and self._thread.is_alive()):
                return self.idle
            time.sleep(0.02)
        return True

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping and not self._draining

    def submit(self, req: GenRequest) -> None:
        """Queue a chat request (all its ``n`` sequences); raises :class:`QueueFull` / :class:`EngineUnavailable`."""
        with self._cv:
            if self._stopping or self._draining:
                raise EngineUnavailable("the server is shutting down")
            if self._thread is not None and not self._thread.is_alive():
                raise EngineUnavailable("the engine is not running")
            if self._queued(req.n) > self.max_queue:
                self.counters["rejected"] += 1
                raise QueueFull(f"the queue is full ({len(self._waiting)} sequences waiting for a row, --max-queue "
                                f"{self.max_queue}); retry later", retry_after=self._retry_after())
            self.counters["requests"] += 1
            self.counters["sequences"] += req.n
            for i in range(req.n):
                self._waiting.append(_Seq(req, i))
            self._cv.notify_all()

    def submit_choice(self, job: ChoiceJob) -> None:
        with self._cv:
            if self._stopping or self._draining:
                raise EngineUnavailable("the server is shutting down")
            if self._thread is not None and not self._thread.is_alive():
                raise EngineUnavailable("the engine is not running")
            if self._queued(1) > self.max_queue:
                self.counters["rejected"] += 1
                raise QueueFull(f"the queue is full (--max-queue {self.max_queue}); retry later",
                                retry_after=self._retry_after())
            self.counters["choice_requests"] += 1
            self._choices.append(job)
            self._cv.notify_all()

    def cancel(self, request_id: str) -> None:
        """Drop a request's sequences, waiting or running (its client went away)."""
        with self._cv:
            self._cancels.add(request_id)
            self._cv.notify_all()

    def stats(self) -> dict[str, Any]:
        batch = self._batch
        with self._cv:
            waiting = len(self._waiting)
            queued = self._queued()
        return {"running": len(batch) if batch is not None else 0, "waiting": waiting, "queued": queued,
                "max_batch_size": self.max_batch_size, "max_queue": self.max_queue, **self.counters}

    def _queued(self, extra: int = 0) -> int:
        """Sequences (and choice jobs) waiting beyond the rows that are free right now, ``extra`` more included."""
        batch = self._batch
        free = self.max_batch_size - (len(batch) if batch is not None else 0)
        return max(0, len(self._waiting) + len(self._choices) + extra - free)

    def _retry_after(self) -> int:
        return max(1, min(30, len(self._waiting) // self.max_batch_size))

    # ------------------------------------------------------------------------------------------------------ worker

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not (self._stopping or self._waiting or self._choices or self._cancels or self._batch):
                        self._cv.wait()
                    if self._stopping:
                        break
                    if self._batch is None and self._waiting and not self._choices and self.max_wait > 0:
                        deadline = self._waiting[0].req.arrival + self.max_wait
                        while (not self._stopping and len(self._waiting) < self.max_batch_size
                               and time.monotonic() < deadline):
                            self._cv.wait(max(0.0, deadline - time.monotonic()))
                        if self._stopping:
                            break
                    cancels, self._cancels = self._cancels, set()
                    if cancels:
                        kept = deque(s for s in self._waiting if s.req.request_id not in cancels)
                        for s in self._waiting:
                            if s.req.request_id in cancels and not s.req.cancelled:
                                s.req.cancelled = True
                                self.counters["cancelled"] += 1
                        self._waiting = kept
                        for job in self._choices:
                            if job.request_id in cancels:
                                job.cancelled = True
                    job = self._choices.popleft() if self._choices else None
                    admit: list[_Seq] = []
                    running = len(self._batch) if self._batch is not None else 0
                    if self._mergeable or running == 0:
                        while self._waiting and running + len(admit) < self.max_batch_size:
                            admit.append(self._waiting.popleft())
                    self._working = True
                try:
                    if cancels:
                        self._drop_requests(cancels)
                    if job is not None:
                        self._run_choice(job)
                    if admit:
                        self._prefill(admit)
                    if self._batch is not None:
                        self._step()
                except Exception as err:  # noqa: BLE001 - a failing forward must not take the server down
                    logger.exception("cuma serve: engine step failed")
                    self._fail_all(admit, err)
                finally:
                    with self._cv:
                        self._working = False

    def _send(self, req: GenRequest, event: tuple) -> None:
        if req.cancelled and event[0] != "error":
            return
        try:
            req.sink(event)
        except Exception:  # noqa: BLE001 - a broken sink is the submitter's problem
            logger.exception("cuma serve: event sink failed")

    def _fail_request(self, req: GenRequest, what: str, err: Exception) -> None:
        """End one request whose row failed (its sampling or decoding): an error event, then its rows leave the batch
        (``_accept`` drops the rows of cancelled requests); the rest of the batch goes on."""
        if req.cancelled:
            return
        logger.warning("cuma serve: request %s failed while %s: %s: %s", req.request_id, what, type(err).__name__, err)
        self.counters["errors"] += 1
        self._send(req, ("error", 500, f"this request failed while {what} ({type(err).__name__}: {err}); the other "
                                       "requests of its batch were not affected"))
        req.cancelled = True

    def _fail_all(self, admitted: list[_Seq], err: Exception) -> None:
        seqs = list(admitted) + (list(self._batch.seqs) if self._batch is not None else [])
        self._batch = None
        told = set()
        for seq in seqs:
            if id(seq.req) not in told and seq.finish_reason is None:
                told.add(id(seq.req))
                self.counters["errors"] += 1
                self._send(seq.req, ("error", 500, f"the model failed on this batch ({type(err).__name__}); retry"))
                seq.req.cancelled = True

    # ------------------------------------------------------------------------------------------------------ forward

    def _forward(self, ids, mask, pos, cache, profiles):
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "use_cache": True}
        if cache is not None:
            kwargs[self._cache_kw] = cache
        if self._keep_kw:
            kwargs["logits_to_keep"] = 1
        if profiles is not None:
            kwargs["profile_embeds"] = profiles
        out = self.model(**kwargs)
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = getattr(out, "past_key_values", None)
        return out.logits[:, -1, :], new_cache

    def _prefill(self, seqs: list[_Seq]) -> None:
        live = [s for s in seqs if not s.req.cancelled]
        if not live:
            return
        self.counters["prefills"] += 1
        pad = self.served.pad_id
        length = max(len(s.req.prompt_ids) for s in live)
        ids = torch.full((len(live), length), pad, dtype=torch.long)
        mask = torch.zeros((len(live), length), dtype=torch.long)
        for r, s in enumerate(live):
            p = s.req.prompt_ids
            ids[r, length - len(p):] = torch.as_tensor(p, dtype=torch.long)
            mask[r, length - len(p):] = 1
            self.counters["prompt_tokens"] += len(p)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        profiles = None
        if self.served.uses_profile:
            profiles = self.served.profile_rows([s.req.profile_text or "" for s in live])
        dev = self._device
        logits, cache = self._forward(ids.to(dev), mask.to(dev), pos.to(dev), None, profiles)
        tokens = self._sample(logits, live)
        new = _Batch(live, cache, mask.to(dev), pos[:, -1].to(dev) + 1, tokens.to(dev).view(-1, 1), profiles)
        if _cache_layers(cache) is None:
            self._mergeable = False
        if self._batch is None:
            self._batch = new
        else:
            self._batch = self._merge(self._batch, new)
        self._accept(tokens.tolist(), live)

    def _step(self) -> None:
        b = self._batch
        assert b is not None
        b.mask = torch.cat([b.mask, b.mask.new_ones((len(b), 1))], dim=1)
        pos = b.next_pos.view(-1, 1)
        logits, cache = self._forward(b.last_tok, b.mask, pos, b.cache, b.profiles)
        b.cache = cache
        b.next_pos = b.next_pos + 1
        self.counters["steps"] += 1
        self.counters["max_batch_seen"] = max(self.counters["max_batch_seen"], len(b))
        if self._decode_hook is not None:
            self._decode_hook(len(b))
        tokens = self._sample(logits, b.seqs)
        b.last_tok = tokens.to(b.last_tok.device).view(-1, 1)
        self._accept(tokens.tolist(), b.seqs)

    # --------------------------------------------------------------------------------------------------- sampling

    def _sample(self, logits: torch.Tensor, seqs: list[_Seq]) -> torch.Tensor:
        logits = logits.float().cpu()
        for r, s in enumerate(seqs):
            p = s.req.params
            if self._eos and (p.ignore_eos or s.generated < p.min_tokens):
                logits[r, self._eos] = float("-inf")
        out = logits.argmax(dim=-1)
        for r, s in enumerate(seqs):
            p = s.req.params
            if p.temperature < _TINY or s.req.cancelled:
                continue  # greedy; a temperature that underflows float32 divides by zero, and its limit is greedy
            try:
                out[r] = self._sample_row(logits[r], p, s.generator)
            except Exception as err:  # noqa: BLE001 - one row's failure must not fail its batch-mates
                self._fail_request(s.req, "sampling", err)
        return out

    @staticmethod
    def _sample_row(row: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> int:
        # shifted by the max first: a small temperature then sends the others to -inf, never the top logit to inf
        probs = torch.softmax((row - row.max()) / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = (sorted_p.cumsum(0) - sorted_p) < p.top_p
            keep[0] = True  # a top_p that rounds to 0 in float32 still keeps the likeliest token
            sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
            pick = torch.multinomial(sorted_p, 1, generator=generator)
            return int(order[pick[0]])
        return int(torch.multinomial(probs, 1, generator=generator)[0])

    def _accept(self, tokens: list[int], seqs: list[_Seq]) -> None:
        """Append each row's token, emit text that can no longer change, and drop finished rows."""
        done = []
        for tok, s in zip(tokens, seqs):
            if s.req.cancelled or s.finish_reason is not None:
                done.append(s)
                continue
            try:
                self._advance(s, int(tok))
            except Exception as err:  # noqa: BLE001 - e.g. a tokenizer that cannot decode this row's tokens
                self._fail_request(s.req, "decoding its tokens", err)
            if s.finish_reason is not None or s.req.cancelled:
                done.append(s)
        if done:
            self._remove(set(id(s) for s in done))

    def _advance(self, s: _Seq, tok: int) -> None:
        p = s.req.params
        s.generated += 1
        self.counters["generated_tokens"] += 1
        finish = None
        if tok in self._eos and not p.ignore_eos:
            finish = "stop"
        else:
            s.output_ids.append(tok)
            text = self.tokenizer.decode(s.output_ids, skip_special_tokens=True)
            if p.stop:
                start = max(0, s.emitted - max(len(x) for x in p.stop))
                hits = [i for i in (text.find(x, start) for x in p.stop) if i >= 0]
                if hits:
                    text = text[: min(hits)]
                    finish = "stop"
            s.text = text
        if finish is None and s.generated >= p.max_tokens:
            finish = "length"
        end = len(s.text)
        if finish is None:
            if s.text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for its other bytes
                end = len(s.text.rstrip("\ufffd"))
            hold = 0
            for x in p.stop:  # hold back a tail that may still grow into a stop sequence
                for k in range(min(len(x) - 1, end), 0, -1):
                    if s.text[end - k:end] == x[:k]:
                        hold = max(hold, k)
                        break
            end -= hold
        end = max(end, s.emitted)
        if end > s.emitted:
            self._send(s.req, ("delta", s.index, s.text[s.emitted:end]))
            s.emitted = end
        if finish is not None:
            s.finish_reason = finish
            s.req.finished += 1
            if s.req.finished == s.req.n:
                self.counters["completed"] += 1
            self._send(s.req, ("finish", s.index, finish, s.generated, tuple(s.output_ids)))

    # ----------------------------------------------------------------------------------------------- batch surgery

    def _remove(self, drop_ids: set[int]) -> None:
        b = self._batch
        if b is None:
            return
        keep = [i for i, s in enumerate(b.seqs) if id(s) not in drop_ids]
        if len(keep) == len(b):
            return
        if not keep:
            self._batch = None
            return
        layers = _cache_layers(b.cache)
        if layers is None:  # a cache the engine cannot cut: finished rows ride along (skipped) until all are done
            if all(s.finish_reason is not None or s.req.cancelled for s in b.seqs):
                self._batch = None
            return
        idx = torch.as_tensor(keep, dtype=torch.long, device=b.mask.device)
        mask = b.mask.index_select(0, idx)
        lead = int((mask.cumsum(-1) == 0).sum(-1).min())  # columns that are padding in every remaining row
        for layer in layers:
            layer.keys = layer.keys.index_select(0, idx)[:, :, lead:]
            layer.values = layer.values.index_select(0, idx)[:, :, lead:]
        b.mask = mask[:, lead:]
        b.seqs = [b.seqs[i] for i in keep]
        b.next_pos = b.next_pos.index_select(0, idx)
        b.last_tok = b.last_tok.index_select(0, idx)
        if b.profiles is not None:
            b.profiles = b.profiles.index_select(0, idx.to(b.profiles.device))

    def _merge(self, a: _Batch, b: _Batch) -> _Batch:
        la, lb = _cache_layers(a.cache), _cache_layers(b.cache)
        if la is None or lb is None or len(la) != len(lb):
            raise RuntimeError("cannot merge KV caches of this kind")
        length = max(a.mask.shape[1], b.mask.shape[1])
        for x, y in zip(la, lb):
            x.keys = torch.cat([_left_pad(x.keys, length, -2), _left_pad(y.keys, length, -2)], dim=0)
            x.values = torch.cat([_left_pad(x.values, length, -2), _left_pad(y.values, length, -2)], dim=0)
        a.mask = torch.cat([_left_pad(a.mask, length, 1), _left_pad(b.mask, length, 1)], dim=0)
        a.seqs = a.seqs + b.seqs
        a.next_pos = torch.cat([a.next_pos, b.next_pos])
        a.last_tok = torch.cat([a.last_tok, b.last_tok])
        if a.profiles is not None:
            a.profiles = torch.cat([a.profiles, b.profiles])
        return a

    def _drop_requests(self, request_ids: set[str]) -> None:
        b = self._batch
        if b is None:
            return
        drop = set()
        for s in b.seqs:
            if s.req.request_id in request_ids:
                drop.add(id(s))
                if not s.req.cancelled:
                    s.req.cancelled = True
                    self.counters["cancelled"] += 1
        if drop:
            self._remove(drop)

    # ------------------------------------------------------------------------------------------------------ choice

    def _run_choice(self, job: ChoiceJob) -> None:
        if job.cancelled:
            return
        from ..evaluate.scoring import score_prompts

        try:
            rows = None
            if self.served.uses_profile:
                rows = self.served.profile_rows([t or "" for t in job.profile_texts])
            dists = score_prompts(self.model, self.tokenizer, job.prompts, [job.letter_ids] * len(job.prompts),
                                  batch_size=self.max_batch_size, profile_rows=rows, progress=False)
            self.counters["prompt_tokens"] += sum(len(self.tokenizer(p, add_special_tokens=False)["input_ids"])
                                                  for p in job.prompts)
            result: Any = [[float(x) for x in d] for d in dists]
        except Exception as err:  # noqa: BLE001 - reported to the client as a 500
            logger.exception("cuma serve: choice scoring failed")
            self.counters["errors"] += 1
            result = err
        job.done(result)
