"""`cuma serve`: the engine in process (batching, KV-cache surgery, sampling, cancellation, choice scoring) and the
HTTP server as a live process on 127.0.0.1 (OpenAI client, streaming, every bad-input case, auth, limits, the
project's HTTP judge). Tiny models built in code; the SmolLM2 check at the end is marked slow."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_chat_tokenizer, tiny_llama

KEY = "test-key-123"
PROFILES = [
    {"country": "Egypt", "age_group": "25-34 years old", "religion": "Muslim"},
    {"country": "Sweden", "age_group": "55-64 years old", "religion": "None"},
    {"country": "Japan", "gender": "Female"},
    "Country: Brazil. Age group: 18-24 years old.",
]


# ------------------------------------------------------------------------------------------------------ fixtures


def _save_tiny_encoder(path: Path) -> None:
    """A 16-d BERT encoder with the chat tokenizer: a real ProfileEncoder folder, built in code."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    # initializer_range=1: a random encoder whose sentence vectors differ enough to change the routing
    enc = BertModel(BertConfig(vocab_size=128, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=512, pad_token_id=0,
                               initializer_range=1.0))
    enc.save_pretrained(path)
    tiny_chat_tokenizer().save_pretrained(path)


def make_serve_dirs(root: Path) -> dict[str, Path]:
    """model/ (tiny Llama, context 2048, ChatML tokenizer), encoder/ (16-d), adapter/ (CuMA with random B, trained
    as if on WVB data: run.json -> data/manifest.json names the encoder) and adapter-noprompt/ (the profile only in
    profile_embeds, not in the prompt)."""
    from cuma import methods

    dirs = {k: root / k for k in ("model", "encoder", "adapter", "adapter-noprompt", "data")}
    tiny_llama(seed=0, max_position_embeddings=2048).save_pretrained(dirs["model"])
    tiny_chat_tokenizer().save_pretrained(dirs["model"])
    _save_tiny_encoder(dirs["encoder"])
    for name, pip in (("adapter", True), ("adapter-noprompt", False)):
        base = tiny_llama(seed=0, max_position_embeddings=2048)
        torch.manual_seed(1)
        built = methods.build("cuma", base, r=4, lora_alpha=8, num_experts=4, top_k=2, profile_dim=16,
                              init_weights=False, profile_in_prompt=pip)
        methods.save(built, dirs[name])
    dirs["data"].mkdir()
    (dirs["data"] / "manifest.json").write_text(json.dumps({
        "format": "cuma-prepared-wvb",
        "options": {"encoder": str(dirs["encoder"])},
        "encoder": {"source": str(dirs["encoder"]), "pooling": "mean", "normalize": True, "max_length": 128},
    }))
    (dirs["adapter"] / "run.json").write_text(json.dumps({"command": "cuma train sft",
                                                          "data": {"path": str(dirs["data"])}}))
    return dirs


@pytest.fixture(scope="session")
def serve_dirs(tmp_path_factory):
    return make_serve_dirs(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def served(serve_dirs):
    from cuma.serve.served import ServedModel

    return ServedModel.load(str(serve_dirs["model"]), str(serve_dirs["adapter-noprompt"]),
                            encoder=str(serve_dirs["encoder"]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m cuma.cli serve ...` on 127.0.0.1 at a free port, waited on through /health."""

    def __init__(self, args: list[str], env: dict | None = None, timeout: float = 120.0) -> None:
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile(mode="w+")
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        cmd = [sys.executable, "-m", "cuma.cli", "serve", *args, "--port", str(self.port), "--threads", "1",
               "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=full_env)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cuma serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"cuma serve did not answer /health within {timeout}s:\n{self.output()}")
            time.sleep(0.2)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def health(self) -> dict:
        import httpx

        return httpx.get(self.url + "/health", timeout=10).json()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def server(serve_dirs):
    """CuMA tiny adapter (encoder found through its training record), key from CUMA_API_KEY, small limits."""
    proc = ServerProcess(
        ["--model", str(serve_dirs["model"]), "--adapter", str(serve_dirs["adapter"]), "--served-name", "tiny-cuma",
         "--max-batch-size", "2", "--max-queue", "2", "--max-body-bytes", "65536", "--max-tokens-limit", "1900",
         "--max-wait-ms", "20"],
        env={"CUMA_API_KEY": KEY},
    )
    yield proc
    out = proc.output()
    proc.close()
    assert "Traceback" not in out, out  # nothing failed inside the server during the module's tests


def _client(server, **kw):
    import httpx

    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60, **kw)


# ------------------------------------------------------------------------------------------------ engine (in process)


def _collect(engine, requests, start=True, on_event=None, timeout=60.0):
    """Submit [(rid, prompt_ids, params, profile_text)] and wait for all; {rid: (text, finish_reason, token_ids)}."""
    from cuma.serve.engine import GenRequest

    events: dict[str, list] = {}
    done = threading.Event()
    left = [len(requests)]
    lock = threading.Lock()

    def sink_for(rid):
        def sink(ev):
            with lock:
                events.setdefault(rid, []).append(ev)
                if ev[0] in ("finish", "error"):
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()
            if on_event is not None:
                on_event(rid, ev)
        return sink

    for rid, ids, params, profile in requests:
        engine.submit(GenRequest(rid, ids, params, sink_for(rid), profile_text=profile))
    if start:
        engine.start()
    assert done.wait(timeout), f"engine did not finish: {events}"
    out = {}
    for rid, evs in events.items():
        fin = [e for e in evs if e[0] == "finish"]
        assert fin, evs
        out[rid] = ("".join(e[2] for e in evs if e[0] == "delta"), fin[0][2], fin[0][4])
    return out


def _greedy(max_tokens, **kw):
    from cuma.serve.engine import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def _engine(served, **kw):
    from cuma.serve.engine import Engine

    return Engine(served, **{"max_batch_size": 8, "max_wait_ms": 0, **kw})


def _requests(served):
    from cuma.profiles import Profile

    texts = [Profile(**p).to_text() if isinstance(p, dict) else p for p in PROFILES]
    msgs = ["Hi", "What do you think about family and work, honestly?", "Tell me about your country.", "Why?"]
    out = []
    for i, (m, t) in enumerate(zip(msgs, texts)):
        ids = served.chat_prompt_ids([{"role": "user", "content": m}], t)
        out.append((f"r{i}", ids, _greedy(12 + 9 * i, ignore_eos=True), t))
    return out


def test_greedy_alone_equals_mixed_batch(served):
    """Four requests with different lengths, profiles and max_tokens: each row's greedy tokens in one left-padded
    batch equal the tokens of the same request alone. Then one prompt with four profiles (which give different
    tokens alone): in one batch each row still gives its own profile's tokens."""
    reqs = _requests(served)
    assert len({len(r[1]) for r in reqs}) == len(reqs)  # all prompt lengths differ
    alone = {}
    for r in reqs:
        e = _engine(served)
        alone.update(_collect(e, [r]))
        e.stop()
    e = _engine(served)
    batched = _collect(e, reqs)  # submitted before the worker starts: one prefill for all four
    stats = e.stats()
    e.stop()
    assert stats["prefills"] == 1 and stats["max_batch_seen"] == 4
    for rid, ids, params, _ in reqs:
        assert batched[rid][2] == alone[rid][2], rid
        assert len(alone[rid][2]) == params.max_tokens
        assert batched[rid][1] == "length"
    # one prompt, four profiles: the rows of one batch differ only by profile_embeds
    rid, ids, _, _ = reqs[3]
    same = [(f"p{i}", ids, _greedy(30, ignore_eos=True), r[3]) for i, r in enumerate(reqs)]
    alone = {}
    for r in same:
        e = _engine(served)
        alone.update(_collect(e, [r]))
        e.stop()
    e = _engine(served)
    batched = _collect(e, same)
    e.stop()
    assert [batched[r[0]][2] for r in same] == [alone[r[0]][2] for r in same]
    assert len({alone[r[0]][2] for r in same}) >= 2  # the profiles matter, so a mixed-up row would show


def test_rows_joining_mid_decode_keep_their_tokens(served):
    """Requests that arrive while another one is decoding are prefilled on their own and merged into the running
    KV cache (left-padded in time); finished rows leave and padding-only columns are cut. Tokens stay those of
    each request alone."""
    reqs = _requests(served)
    alone = {}
    for r in reqs:
        e = _engine(served)
        alone.update(_collect(e, [r]))
        e.stop()
    e = _engine(served)
    long_req = (reqs[3][0], reqs[3][1], _greedy(60, ignore_eos=True), reqs[3][3])
    e_alone = _engine(served)
    long_alone = _collect(e_alone, [long_req])
    e_alone.stop()
    joined = threading.Event()
    later = reqs[:3]
    from cuma.serve.engine import GenRequest

    results: dict = {}

    def on_event(rid, ev):
        if rid == long_req[0] and ev[0] == "delta" and not joined.is_set():
            joined.set()
            for r in later:  # from the worker thread, between two steps
                e.submit(GenRequest(r[0], r[1], r[2], lambda ev, rid=r[0]: results.setdefault(rid, []).append(ev),
                                    profile_text=r[3]))

    out = _collect(e, [long_req], on_event=on_event)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and sum(1 for v in results.values() for x in v if x[0] == "finish") < 3:
        time.sleep(0.01)
    stats = e.stats()
    e.stop()
    assert out[long_req[0]][2] == long_alone[long_req[0]][2]
    for rid, *_ in later:
        fin = [x for x in results[rid] if x[0] == "finish"]
        assert fin and fin[0][4] == alone[rid][2], rid
    assert stats["prefills"] >= 2 and stats["max_batch_seen"] >= 2


@pytest.mark.parametrize("method", ["lora", "dora", "hydralora", "mixlora", "cuma-semantic", "fft"])
def test_methods_without_profile_routing_batch_the_same(serve_dirs, tmp_path, method):
    """Adapters that take no profile_embeds: the same greedy tokens alone and in one left-padded batch."""
    from cuma import methods
    from cuma.serve.served import ServedModel

    base = tiny_llama(seed=0, max_position_embeddings=2048)
    torch.manual_seed(2)
    options = {"lora": {"r": 4, "init_weights": False}, "dora": {"r": 4, "init_weights": False},
               "hydralora": {"r": 4, "init_weights": False}, "mixlora": {"r": 4},
               "cuma-semantic": {"r": 4, "num_experts": 4, "init_weights": False}, "fft": {}}[method]
    methods.save(methods.build(method, base, **options), tmp_path / method)
    s = ServedModel.load(str(serve_dirs["model"]), str(tmp_path / method))
    assert not s.uses_profile
    reqs = [(f"m{i}", s.chat_prompt_ids([{"role": "user", "content": "Hi" + "?" * (5 * i)}], None),
             _greedy(8 + 3 * i, ignore_eos=True), None) for i in range(3)]
    alone = {}
    for r in reqs:
        e = _engine(s)
        alone.update(_collect(e, [r]))
        e.stop()
    e = _engine(s)
    batched = _collect(e, reqs)
    e.stop()
    assert {k: v[2] for k, v in batched.items()} == {k: v[2] for k, v in alone.items()}


def test_engine_matches_full_forward_greedy(served):
    """The KV-cache decode gives the tokens of a cache-free greedy loop (full forward each step, no padding)."""
    rid, ids, _, text = _requests(served)[1]
    e = _engine(served)
    out = _collect(e, [(rid, ids, _greedy(10, ignore_eos=True), text)])
    e.stop()
    seq = torch.tensor([ids])
    prof = served.profile_rows([text])
    toks = []
    with torch.no_grad():
        for _ in range(10):
            logits = served.model(input_ids=seq, attention_mask=torch.ones_like(seq), profile_embeds=prof).logits[0, -1]
            logits[list(served.eos_ids)] = float("-inf")
            t = int(logits.argmax())
            toks.append(t)
            seq = torch.cat([seq, torch.tensor([[t]])], dim=1)
    assert list(out[rid][2]) == toks


def test_stop_sequences_and_streamed_text(served):
    rid, ids, _, text = _requests(served)[2]
    e = _engine(served)
    full = _collect(e, [(rid, ids, _greedy(40, ignore_eos=True), text)])[rid][0]
    e.stop()
    assert len(full) > 12
    stop = full[6:9]
    cut = full[: full.find(stop)]
    events = []
    e = _engine(served)
    out = _collect(e, [(rid, ids, _greedy(40, ignore_eos=True, stop=(stop, "\u00a7never")), text)],
                   on_event=lambda r, ev: events.append(ev))
    e.stop()
    assert out[rid][0] == cut and out[rid][1] == "stop"
    assert all(stop not in ev[2] for ev in events if ev[0] == "delta")


def test_seeded_sampling_is_per_row(served):
    from cuma.serve.engine import SamplingParams

    reqs = _requests(served)
    sampled = (reqs[0][0], reqs[0][1], SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=7,
                                                      ignore_eos=True), reqs[0][3])
    e = _engine(served)
    alone = _collect(e, [sampled])
    e.stop()
    e = _engine(served)
    mixed = _collect(e, [sampled] + reqs[1:])
    e.stop()
    assert mixed[sampled[0]][2] == alone[sampled[0]][2]
    other = (sampled[0], sampled[1], SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=8,
                                                    ignore_eos=True), sampled[3])
    e = _engine(served)
    assert _collect(e, [other])[sampled[0]][2] != alone[sampled[0]][2]
    e.stop()


def test_cancel_frees_the_row_and_queue_limit(served):
    from cuma.serve.engine import GenRequest, QueueFull

    rid, ids, _, text = _requests(served)[0]
    e = _engine(served, max_queue=1, max_batch_size=1)
    first = threading.Event()
    events = []

    def sink(ev):
        events.append(ev)
        first.set()

    e.submit(GenRequest("long", ids, _greedy(1800, ignore_eos=True), sink, profile_text=text))
    e.submit(GenRequest("w1", ids, _greedy(5), lambda ev: None, profile_text=text))
    with pytest.raises(QueueFull):
        e.submit(GenRequest("w2", ids, _greedy(5), lambda ev: None, profile_text=text))
    e.start()
    assert first.wait(30)
    e.cancel("long")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (e.stats()["running"] or e.stats()["waiting"]):
        time.sleep(0.01)
    stats = e.stats()
    e.stop()
    assert stats["running"] == 0 and stats["cancelled"] == 1 and stats["rejected"] == 1
    assert not any(ev[0] == "finish" for ev in events)
    assert stats["generated_tokens"] < 1800


def test_engine_survives_a_failing_forward(served, monkeypatch):
    rid, ids, params, text = _requests(served)[0]
    e = _engine(served)
    real = e._forward
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(e, "_forward", flaky)
    got = []
    from cuma.serve.engine import GenRequest

    done = threading.Event()
    e.submit(GenRequest("bad", ids, params, lambda ev: (got.append(ev), done.set()), profile_text=text))
    e.start()
    assert done.wait(30)
    assert got[0][0] == "error" and got[0][1] == 500 and "RuntimeError" in got[0][2]
    out = _collect(e, [(rid, ids, params, text)], start=False)
    e.stop()
    assert out[rid][1] == "length"


def test_choice_scores_exactly_like_eval(served):
    """/v1/choice's engine path gives the probabilities of cuma.evaluate.scoring.score_records (cuma eval wvb)."""
    from cuma.evaluate.scoring import score_records
    from cuma.profiles import Profile
    from cuma.serve.engine import ChoiceJob

    texts = [Profile(**p).to_text() if isinstance(p, dict) else p for p in PROFILES]
    options = ["Very important", "Rather important", "Not very important", "Not at all important"]
    prompts, letter_ids, letters = served.choice_prompts("How important is family?", options, texts)
    got = {}
    done = threading.Event()
    e = _engine(served, max_batch_size=3)
    e.start()
    e.submit_choice(ChoiceJob("c", prompts, letter_ids, texts, lambda r: (got.setdefault("r", r), done.set())))
    assert done.wait(30)
    e.stop()
    records = [{"id": i, "question_id": "Q1", "question": "How important is family?", "letters": letters,
                "options": options, "option_values": [1, 2, 3, 4], "scale_min": 1, "scale_max": 4,
                "gold_letter": "A", "gold_value": 1, "profile_text": t, "profile_index": i}
               for i, t in enumerate(texts)]
    table = served.profile_rows(texts).cpu()
    ref = score_records(served.model, served.worker_tokenizer, records, batch_size=2, profile_table=table,
                        profile_in_prompt=served.profile_in_prompt, progress=False)
    for probs, r in zip(got["r"], ref):
        assert probs == pytest.approx(r["probs"], abs=1e-6)
        assert sum(probs) == pytest.approx(1.0)
    assert len({round(p[0], 6) for p in got["r"]}) > 1  # the profiles change the distribution


def test_encoder_and_prompt_style_from_the_training_record(serve_dirs, tmp_path):
    from cuma.serve.served import find_encoder, prompt_style_of

    spec, where = find_encoder(str(serve_dirs["adapter"]))
    assert spec["source"] == str(serve_dirs["encoder"]) and spec["max_length"] == 128
    assert where == "training data manifest"
    assert prompt_style_of(str(serve_dirs["adapter"]))[0] == "wvb"
    (tmp_path / "resolved_config.yaml").write_text("data:\n  path: /nowhere\n  encoder: some/encoder\n  format: conversations\n")
    assert find_encoder(str(tmp_path)) == ({"source": "some/encoder"}, "resolved_config.yaml data.encoder")
    assert prompt_style_of(str(tmp_path))[0] == "preference"
    assert find_encoder(str(serve_dirs["adapter-noprompt"]))[0] is None  # no record: the caller uses the default


def test_profile_goes_into_the_system_prompt_as_in_training(serve_dirs):
    from cuma.data.prompts import PROFILE_PREFIX, SYSTEM_INSTRUCTION
    from cuma.serve.served import ServedModel

    s = ServedModel.load(str(serve_dirs["model"]), str(serve_dirs["adapter"]))  # encoder from the record
    assert s.info["encoder"]["found"] == "training data manifest" and s.prompt_style == "wvb"
    msgs = s.chat_messages([{"role": "user", "content": "Hi"}], "Country: Egypt.")
    assert msgs[0] == {"role": "system", "content": f"{SYSTEM_INSTRUCTION}\n{PROFILE_PREFIX}Country: Egypt."}
    own = s.chat_messages([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "Country: Egypt.")
    assert own[0]["content"] == f"Be brief.\n{PROFILE_PREFIX}Country: Egypt." and len(own) == 2
    from cuma.data.conversations import PREFERENCE_SYSTEM_PROMPT
    from cuma.data.conversations import PROFILE_PREFIX as USER_PREFIX

    persona = ServedModel.load(str(serve_dirs["model"]), method="persona")
    assert persona.prompt_style == "preference" and not persona.uses_profile
    assert persona.chat_messages([{"role": "user", "content": "Hi"}], "Country: Egypt.")[0]["content"] == (
        f"{PREFERENCE_SYSTEM_PROMPT}\n{USER_PREFIX}Country: Egypt.")
    base = ServedModel.load(str(serve_dirs["model"]), method="base")
    assert not base.uses_profile and "Egypt" not in json.dumps(base.chat_messages([{"role": "user", "content": "Hi"}],
                                                                                  "Country: Egypt."))


# -------------------------------------------------------------------------------------------------- live server


def test_health_models_and_auth(server):
    import httpx

    h = httpx.get(server.url + "/health").json()  # no key needed (load balancers)
    assert h["status"] == "ok" and h["model"] == "tiny-cuma"
    r = httpx.get(server.url + "/v1/models")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": "Bearer wrong"},
                   json={"messages": [{"role": "user", "content": "hi"}], "profile": PROFILES[0]})
    assert r.status_code == 401
    with _client(server) as c:
        models = c.get("/v1/models").json()
        assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny-cuma"]
        info = c.get("/info").json()
    assert info["method"] == "cuma" and info["uses_profile"] and info["auth_required"]
    assert info["encoder"]["found"] == "training data manifest" and info["prompt_style"] == "wvb"


def test_openai_client_chat_and_stream(server):
    import httpx
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    kw = dict(model="tiny-cuma", messages=[{"role": "user", "content": "How important is family?"}],
              max_tokens=16, temperature=0, extra_body={"profile": PROFILES[0], "ignore_eos": True})
    full = client.chat.completions.create(**kw)
    assert full.object == "chat.completion" and full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 16 and full.usage.prompt_tokens > 0
    text = full.choices[0].message.content
    assert text
    parts, finish, usage = [], None, None
    for ch in client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        assert ch.object == "chat.completion.chunk"
        if ch.choices:
            parts.append(ch.choices[0].delta.content or "")
            finish = ch.choices[0].finish_reason or finish
        if ch.usage:
            usage = ch.usage
    assert "".join(parts) == text and finish == "length" and usage.completion_tokens == 16
    # raw SSE: chunk objects, the last event is data: [DONE]
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={**{k: v for k, v in kw.items() if k != "extra_body"}, **kw["extra_body"], "stream": True},
                      timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"
    # n choices, seeded sampling: reproducible
    a = client.chat.completions.create(**{**kw, "temperature": 1.0}, n=3, seed=11)
    b = client.chat.completions.create(**{**kw, "temperature": 1.0}, n=3, seed=11)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1


def test_concurrent_requests_share_batches_and_match_alone(server):
    """Mixed profiles sent together over HTTP give the greedy text each gives alone."""
    from concurrent.futures import ThreadPoolExecutor

    bodies = [{"messages": [{"role": "user", "content": "Hello" + "!" * i}], "profile": p, "max_tokens": 10 + i,
               "temperature": 0, "ignore_eos": True} for i, p in enumerate(PROFILES)]
    with _client(server) as c:
        alone = [c.post("/v1/chat/completions", json=b).json()["choices"][0]["message"]["content"] for b in bodies]
        before = c.get("/health").json()
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda b: c.post("/v1/chat/completions", json=b).json(), bodies))
        after = c.get("/health").json()
    assert [t["choices"][0]["message"]["content"] for t in together] == alone
    steps = after["steps"] - before["steps"]
    tokens = after["generated_tokens"] - before["generated_tokens"]
    assert tokens == sum(b["max_tokens"] for b in bodies)
    assert steps < tokens - len(bodies)  # one row per step would take tokens - (first tokens from prefills) steps
    assert len(set(alone)) > 1


def _bad(server, body, path="/v1/chat/completions", raw=None, headers=None):
    with _client(server) as c:
        if raw is not None:
            r = c.post(path, content=raw, headers={"Content-Type": "application/json", **(headers or {})})
        else:
            r = c.post(path, json=body)
    return r


MSG = [{"role": "user", "content": "hi"}]
P0 = PROFILES[0]
BAD = [
    ("malformed JSON", None, b'{"messages": [', None, "invalid_json"),
    ("body not an object", None, b"[1, 2]", None, "invalid_type"),
    ("wrong type: n", {"messages": MSG, "profile": P0, "n": "2"}, None, "n", "invalid_value"),
    ("wrong type: temperature", {"messages": MSG, "profile": P0, "temperature": "hot"}, None, "temperature", None),
    ("wrong type: stream", {"messages": MSG, "profile": P0, "stream": "yes"}, None, "stream", None),
    ("wrong type: messages", {"messages": "hi", "profile": P0}, None, "messages", None),
    ("wrong type: content", {"messages": [{"role": "user", "content": 5}], "profile": P0}, None,
     "messages[0].content", None),
    ("wrong type: stop", {"messages": MSG, "profile": P0, "stop": [1]}, None, "stop", None),
    ("missing messages", {"profile": P0}, None, "messages", "missing_field"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}], "profile": P0}, None, "messages[0].role",
     "invalid_role"),
    ("empty conversation", {"messages": [], "profile": P0}, None, "messages", "empty_conversation"),
    ("system only", {"messages": [{"role": "system", "content": "x"}], "profile": P0}, None, "messages",
     "empty_conversation"),
    ("n = 0", {"messages": MSG, "profile": P0, "n": 0}, None, "n", None),
    ("n too large", {"messages": MSG, "profile": P0, "n": 17}, None, "n", None),
    ("max_tokens = 0", {"messages": MSG, "profile": P0, "max_tokens": 0}, None, "max_tokens", None),
    ("max_tokens over the limit", {"messages": MSG, "profile": P0, "max_tokens": 5000}, None, "max_tokens", None),
    ("max_completion_tokens negative", {"messages": MSG, "profile": P0, "max_completion_tokens": -1}, None,
     "max_completion_tokens", None),
    ("prompt longer than the context", {"messages": [{"role": "user", "content": "x" * 2100}], "profile": P0}, None,
     "messages", "context_length_exceeded"),
    ("prompt + max_tokens over the context", {"messages": [{"role": "user", "content": "x" * 1200}], "profile": P0,
                                              "max_tokens": 1000}, None, "max_tokens", "context_length_exceeded"),
    ("CuMA without a profile", {"messages": MSG}, None, "profile", "profile_required"),
    ("unknown profile field", {"messages": MSG, "profile": {"country": "Egypt", "planet": "Mars"}}, None,
     "profile.planet", "unknown_profile_field"),
    ("profile of the wrong type", {"messages": MSG, "profile": ["Egypt"]}, None, "profile", "invalid_profile"),
    ("profile value of the wrong type", {"messages": MSG, "profile": {"country": ["Egypt"]}}, None,
     "profile.country", "invalid_profile"),
    ("empty profile", {"messages": MSG, "profile": {"country": None}}, None, "profile", "invalid_profile"),
    ("temperature out of range", {"messages": MSG, "profile": P0, "temperature": 3}, None, "temperature", None),
    ("too many stop sequences", {"messages": MSG, "profile": P0, "stop": list("abcde")}, None, "stop", None),
    ("logprobs", {"messages": MSG, "profile": P0, "logprobs": True}, None, "logprobs", "unsupported"),
    ("image content", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
                       "profile": P0}, None, "messages[0].content[0]", "invalid_content"),
]


@pytest.mark.parametrize("name,body,raw,param,code", BAD, ids=[b[0] for b in BAD])
def test_bad_chat_input_is_a_400_naming_the_field(server, name, body, raw, param, code):
    r = _bad(server, body, raw=raw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param
    if code:
        assert err["code"] == code
    if param:
        assert param.split("[")[0].split(".")[0] in err["message"]
    assert "Traceback" not in r.text


BAD_CHOICE = [
    ("one option", {"question": "Q?", "options": ["a"], "profiles": [P0]}, "options"),
    ("no profiles", {"question": "Q?", "options": ["a", "b"], "profiles": []}, "profiles"),
    ("empty question", {"question": "", "options": ["a", "b"], "profiles": [P0]}, "question"),
    ("empty option", {"question": "Q?", "options": ["a", " "], "profiles": [P0]}, "options[1]"),
    ("profile missing", {"question": "Q?", "options": ["a", "b"], "profiles": [P0, None]}, "profiles[1]"),
    ("unknown profile field", {"question": "Q?", "options": ["a", "b"], "profiles": [{"planet": "Mars"}]},
     "profiles[0].planet"),
    ("options not strings", {"question": "Q?", "options": [1, 2], "profiles": [P0]}, "options[0]"),
]


@pytest.mark.parametrize("name,body,param", BAD_CHOICE, ids=[b[0] for b in BAD_CHOICE])
def test_bad_choice_input_is_a_400(server, name, body, param):
    r = _bad(server, body, path="/v1/choice")
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_unknown_model_404_unknown_route_405(server):
    with _client(server) as c:
        r = c.post("/v1/chat/completions", json={"model": "gpt-9", "messages": MSG, "profile": P0})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = c.post("/v1/choice", json={"model": "gpt-9", "question": "Q?", "options": ["a", "b"], "profiles": [P0]})
        assert r.status_code == 404
        assert c.get("/v1/nothing").status_code == 404 and "error" in c.get("/v1/nothing").json()
        r = c.delete("/v1/models")
        assert r.status_code == 405 and "error" in r.json()


def test_oversized_body_is_413(server):
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 100_000}], "profile": P0}).encode()
    r = _bad(server, None, raw=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    def chunks():  # no Content-Length: counted while it arrives
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]

    with _client(server) as c:
        r = c.post("/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert server.health()["status"] == "ok"


def _wait(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_queue_full_is_429_with_retry_after_and_disconnects_free_rows(server):
    """--max-batch-size 2, --max-queue 2: two long streams run, two wait, the fifth request is refused. Closing the
    streams cancels their sequences, running or waiting."""
    long = {"messages": MSG, "profile": P0, "max_tokens": 1800, "ignore_eos": True, "temperature": 0, "stream": True}
    before = server.health()
    with _client(server) as c, contextlib.ExitStack() as stack:
        streams = []
        for i in range(4):
            r = stack.enter_context(c.stream("POST", "/v1/chat/completions", json=long))
            assert r.status_code == 200
            streams.append(r)
            if i < 2:  # wait until it holds a row (its first token arrived)
                lines = r.iter_lines()
                streams.append(lines)  # keep the iterator: collecting it would close the connection
                while True:
                    line = next(lines)
                    if '"content":"' in line and '"role"' not in line:
                        break
        assert _wait(lambda: server.health()["waiting"] == 2, 10), json.dumps(server.health())
        r = c.post("/v1/chat/completions", json={**long, "stream": False})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
        r = c.post("/v1/choice", json={"question": "Q?", "options": ["a", "b"], "profiles": [P0]})
        assert r.status_code == 429
    # the with-block closed all four connections mid-stream
    assert _wait(lambda: (lambda h: h["running"] == 0 and h["waiting"] == 0)(server.health()))
    after = server.health()
    assert after["cancelled"] - before["cancelled"] == 4
    assert after["completed"] == before["completed"]
    assert after["generated_tokens"] - before["generated_tokens"] < 2 * 1800


def test_non_streaming_client_disconnect_frees_its_row(server):
    import httpx

    before = server.health()
    body = {"messages": MSG, "profile": P0, "max_tokens": 1800, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=httpx.Timeout(5, read=0.5))
    assert _wait(lambda: server.health()["running"] == 0)
    after = server.health()
    assert after["cancelled"] - before["cancelled"] == 1 and after["completed"] == before["completed"]


def test_http_judge_against_cuma_serve(server, monkeypatch):
    """cuma.evaluate.judges.HTTPJudge talks to cuma serve: its request is accepted, the reply is read from the
    OpenAI response (the tiny model's words are no verdict: counted as unparseable, never as a failure)."""
    from cuma.evaluate.judges import HTTPJudge, build_judge_messages, judge_pair

    monkeypatch.setenv("CUMA_TEST_JUDGE_KEY", KEY)
    judge = HTTPJudge(server.url + "/v1", "tiny-cuma", api_key_env="CUMA_TEST_JUDGE_KEY", max_retries=0,
                      extra_body={"profile": P0})
    messages = build_judge_messages("Is family important?", "Country: Egypt.", "Yes.", "No.")
    reply = judge._request(messages)
    with _client(server) as c:
        direct = c.post("/v1/chat/completions", json={"model": "tiny-cuma", "messages": messages, "temperature": 0.0,
                                                      "max_tokens": 8, "profile": P0}).json()
    assert isinstance(reply, str) and reply == direct["choices"][0]["message"]["content"]
    result = asyncio.run(judge_pair(judge, "Is family important?", "Country: Egypt.", "Yes.", "No."))
    assert result["outcome"] in ("win", "tie", "loss", "invalid")
    assert judge.stats["failed"] == 0 and judge.stats["requests"] == 3 and judge.stats.get("retries", 0) == 0
    judge.close()


def test_server_still_healthy(server):
    """After every bad input above, the same process still answers."""
    with _client(server) as c:
        r = c.post("/v1/chat/completions", json={"messages": MSG, "profile": P0, "max_tokens": 3})
    assert r.status_code == 200 and server.proc.poll() is None


def test_cli_refuses_bad_setups(serve_dirs, tmp_path):
    from cuma.cli import main

    assert main(["serve", "--model", str(serve_dirs["model"]), "--adapter", str(tmp_path / "missing")]) == 2
    assert main(["serve", "--model", str(serve_dirs["model"]), "--adapter", str(serve_dirs["adapter-noprompt"]),
                 "--encoder", str(serve_dirs["model"])]) == 2  # a 32-d "encoder" for a 16-d adapter


# ------------------------------------------------------------------------------------------------------ slow: SmolLM2


@pytest.mark.slow
def test_smollm2_cuma_server_end_to_end(tmp_path):
    """SmolLM2-135M with a CuMA adapter (random B, 384-d profiles from the default MiniLM encoder): chat through the
    openai client, and /v1/choice equal to cuma eval wvb's scoring of the same records."""
    import openai

    from cuma import methods, models
    from cuma.encoder import ProfileEncoder
    from cuma.evaluate.scoring import score_records

    base = models.load_base("smollm2-135m")
    torch.manual_seed(0)
    built = methods.build("cuma", base, profile_dim=384, init_weights=False)
    methods.save(built, tmp_path / "cuma")
    proc = ServerProcess(["--adapter", str(tmp_path / "cuma"), "--served-name", "smol-cuma"], timeout=300)
    try:
        client = openai.OpenAI(base_url=proc.url + "/v1", api_key="unused", max_retries=0)
        out = client.chat.completions.create(model="smol-cuma", messages=[{"role": "user", "content": "Say hello."}],
                                             max_tokens=12, temperature=0, extra_body={"profile": P0})
        assert out.choices[0].message.content.strip()
        options = ["Very important", "Rather important", "Not very important", "Not at all important"]
        import httpx

        got = httpx.post(proc.url + "/v1/choice", json={"question": "How important is family in your life?",
                                                        "options": options, "profiles": PROFILES[:3]}, timeout=120).json()
    finally:
        proc.close()
    from cuma.profiles import Profile

    texts = [Profile(**p).to_text() for p in PROFILES[:3]]
    records = [{"id": i, "question_id": "Q1", "question": "How important is family in your life?",
                "letters": list("ABCD"), "options": options, "option_values": [1, 2, 3, 4], "scale_min": 1,
                "scale_max": 4, "gold_letter": "A", "gold_value": 1, "profile_text": t, "profile_index": i}
               for i, t in enumerate(texts)]
    base2, tok = models.load_base_and_tokenizer("smollm2-135m")
    ref_model = methods.load(None, base2, tmp_path / "cuma")
    table = ProfileEncoder.default().encode(texts)
    ref = score_records(ref_model.model, tok, records, profile_table=table, profile_in_prompt=ref_model.profile_in_prompt,
                        progress=False)
    for res, r in zip(got["results"], ref):
        assert res["probabilities"] == pytest.approx(r["probs"], abs=1e-4)
        assert res["letter"] == r["pred_letter"]
