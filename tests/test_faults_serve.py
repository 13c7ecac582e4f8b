"""`cuma serve` faults: one request whose sampling fails never fails its batch-mates, sampling values at the edge of
float32, profile fields of any JSON type (a 400-digit number), and a graceful shutdown on SIGTERM / SIGINT with
streams in flight (the official openai client against a live process on 127.0.0.1).

The live server runs with ``CUMA_TEST_STEP_DELAY`` (each decode step sleeps): long streams are then certainly still
in flight when the signal comes, without racing a clock."""

from __future__ import annotations

import json
import math
import signal
import threading
import time

import httpx
import pytest
from test_serve import PROFILES, ServerProcess, _collect, _engine, _requests, serve_dirs  # noqa: F401 (fixture)

from cuma.profiles import Profile, is_missing
from cuma.serve.engine import GenRequest, SamplingParams

HUGE = 10**400


# ------------------------------------------------------------------------------------------------ engine (in process)


@pytest.fixture(scope="module")
def served(serve_dirs):
    from cuma.serve.served import ServedModel

    return ServedModel.load(str(serve_dirs["model"]), str(serve_dirs["adapter-noprompt"]),
                            encoder=str(serve_dirs["encoder"]))


def test_one_rows_failing_sampling_ends_that_row_only(served):
    """A NaN temperature (refused over HTTP, possible in process) makes multinomial fail for its row: that request
    gets an error event, the rows sharing its batch finish with exactly the tokens they get alone."""
    reqs = _requests(served)
    e = _engine(served)
    alone = _collect(e, reqs)
    e.stop()
    got: list = []
    done = threading.Event()
    bad = GenRequest("bad", reqs[0][1], SamplingParams(max_tokens=20, temperature=math.nan, seed=1),
                     lambda ev: (got.append(ev), done.set() if ev[0] in ("error", "finish") else None),
                     profile_text=reqs[0][3])
    # every request waits in the queue until the worker starts and takes them all at once: one prefill, one batch
    e = _engine(served)
    e.submit(bad)
    mixed = _collect(e, reqs)
    e.stop()
    assert done.wait(30)
    assert got[-1][0] == "error" and got[-1][1] == 500 and "sampling" in got[-1][2]
    assert "other requests of its batch were not affected" in got[-1][2]
    assert not any(ev[0] == "finish" for ev in got)
    assert e.counters["max_batch_seen"] >= len(reqs) and e.counters["errors"] == 1
    for rid in alone:
        assert mixed[rid] == alone[rid], rid


@pytest.mark.parametrize("params", [dict(temperature=1e-300), dict(temperature=5e-324), dict(temperature=1e-40),
                                    dict(temperature=1.0, top_p=1e-300), dict(temperature=1e-30, top_p=1e-300)])
def test_sampling_values_at_the_edge_of_float32_decode_greedily(served, params):
    """Temperatures that underflow float32 and a top_p that rounds to 0 act as greedy; their batch-mate (a greedy
    request from another client) is unaffected."""
    (rid, ids, greedy_params, text), other = _requests(served)[:2]
    e = _engine(served)
    reference = _collect(e, [(rid, ids, greedy_params, text), other])
    e.stop()
    e = _engine(served)
    edge = SamplingParams(max_tokens=greedy_params.max_tokens, ignore_eos=True, seed=3, **params)
    out = _collect(e, [(rid, ids, edge, text), other])
    e.stop()
    assert out[rid] == reference[rid] and out[other[0]] == reference[other[0]]


def test_huge_numbers_in_a_profile_are_an_error_naming_the_field():
    assert is_missing(HUGE) is False and is_missing(-HUGE) is True
    for data, field in (({"country": HUGE}, "'country'"), ({"extra": {"wealth": HUGE}}, "'extra.wealth'"),
                        ({"age_group": 1e308 * 10}, "'age_group'"), ({"country": 10**5000}, "'country'")):
        with pytest.raises(ValueError, match=field):
            Profile.from_dict(data)
    assert Profile.from_dict({"country": 1e300}).to_text() == "Country: 1e+300."


# ------------------------------------------------------------------------------------------------ live server


def _server(serve_dirs, drain_timeout: float, delay: float = 0.05) -> ServerProcess:
    return ServerProcess(
        ["--model", str(serve_dirs["model"]), "--adapter", str(serve_dirs["adapter"]), "--served-name", "tiny-cuma",
         "--max-batch-size", "8", "--max-tokens-limit", "1900", "--max-wait-ms", "20",
         "--drain-timeout", str(drain_timeout)],
        env={"CUMA_TEST_STEP_DELAY": str(delay)},
    )


def _chat(max_tokens, **kw):
    return {"messages": [{"role": "user", "content": "Tell me about your country."}], "max_tokens": max_tokens,
            "ignore_eos": True, "profile": PROFILES[0], **kw}


def test_bad_values_over_http_never_fail_a_batch_mate(serve_dirs):
    proc = _server(serve_dirs, drain_timeout=5, delay=0.0)
    try:
        out: dict = {}

        def post(key, **kw):
            out[key] = httpx.post(proc.url + "/v1/chat/completions", json=_chat(6, **kw), timeout=60)

        cases = {"greedy": dict(temperature=0), "t1": dict(temperature=1e-300), "t2": dict(temperature=5e-324),
                 "t3": dict(temperature=1e-40), "p": dict(top_p=1e-300), "big": dict(profile={"country": HUGE}),
                 "big-extra": dict(profile={"country": "Egypt", "extra": {"x": HUGE}})}
        threads = [threading.Thread(target=post, args=(k,), kwargs=kw) for k, kw in cases.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for key in ("greedy", "t1", "t2", "t3", "p"):
            assert out[key].status_code == 200, (key, out[key].text)
        greedy_text = out["greedy"].json()["choices"][0]["message"]["content"]
        for key in ("t1", "t2", "t3"):  # underflowing temperatures are greedy
            assert out[key].json()["choices"][0]["message"]["content"] == greedy_text
        for key, field in (("big", "'country'"), ("big-extra", "'extra.x'")):
            assert out[key].status_code == 400 and field in out[key].json()["error"]["message"]
            assert out[key].json()["error"]["param"] == {"big": "profile.country", "big-extra": "profile.extra.x"}[key]
        # the 400 keeps the keep-alive connection: the same client goes on
        with httpx.Client(base_url=proc.url, timeout=60) as client:
            r1 = client.post("/v1/choice", json={"question": "Is family important?", "options": ["Yes", "No"],
                                                 "profiles": [{"country": "Egypt", "extra": {"n": HUGE}}]})
            assert r1.status_code == 400 and r1.json()["error"]["param"] == "profiles[0].extra.n"
            assert r1.headers.get("connection") != "close"  # the server keeps the connection
            assert client.post("/v1/chat/completions", json=_chat(2)).status_code == 200
    finally:
        output = proc.output()
        proc.close()
    assert "Traceback" not in output, output


def _streams_then_signal(proc: ServerProcess, sig, jobs: list[tuple[str, str, int]], late_request: bool):
    """Start ``jobs`` ([(key, "openai" | "raw", max_tokens)]) as streams, send ``sig`` once every one is in the engine
    (its first chunk arrived), optionally post one more request once the drain has begun (/health 503); returns
    (results, the late response, exit code, output)."""
    import openai

    client = openai.OpenAI(base_url=proc.url + "/v1", api_key="unused", max_retries=0)
    started = threading.Semaphore(0)
    results: dict = {}

    def openai_stream(key, max_tokens):
        first = True
        try:
            body = _chat(max_tokens)
            stream = client.chat.completions.create(
                model="tiny-cuma", stream=True, messages=body["messages"], max_tokens=max_tokens,
                extra_body={"profile": body["profile"], "ignore_eos": True})
            finish = None
            for ev in stream:
                if first:  # the role chunk: the request is in the engine
                    first = False
                    started.release()
                if ev.choices and ev.choices[0].finish_reason:
                    finish = ev.choices[0].finish_reason
            results[key] = ("ok", finish)
        except Exception as err:  # noqa: BLE001 - what the client saw is the result
            results[key] = (type(err).__name__, str(err))
            if first:
                started.release()

    def raw_stream(key, max_tokens):
        lines = []
        with httpx.stream("POST", proc.url + "/v1/chat/completions", json={**_chat(max_tokens), "stream": True},
                          timeout=120) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    if len(lines) == 1:  # the role chunk: the request is in the engine
                        started.release()
        results[key] = lines

    threads = [threading.Thread(target=openai_stream if kind == "openai" else raw_stream, args=(key, n))
               for key, kind, n in jobs]
    late = None
    try:
        for t in threads:
            t.start()
        for _ in jobs:
            assert started.acquire(timeout=120)
        proc.proc.send_signal(sig)
        if late_request:
            for _ in range(1200):  # until the signal is handled: /health turns 503 when the drain begins
                if httpx.get(proc.url + "/health", timeout=10).status_code == 503:
                    break
                time.sleep(0.05)
            late = httpx.post(proc.url + "/v1/chat/completions", json=_chat(2), timeout=30)
        for t in threads:
            t.join(120)
        rc = proc.proc.wait(120)
    finally:
        output = proc.output()
        proc.close()
    return results, late, rc, output


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_lets_the_streams_in_flight_finish(serve_dirs, sig):
    """Within the drain timeout the streams in flight end normally ([DONE], finish_reason "length"), a request that
    arrives meanwhile gets 503 with Retry-After, and the process exits 0 without a traceback. (The drain timeout is
    an upper bound far above the 60 slowed steps the streams need.)"""
    proc = _server(serve_dirs, drain_timeout=120.0)
    jobs = [("a", "openai", 60), ("b", "openai", 60), ("raw", "raw", 60)]
    results, late, rc, output = _streams_then_signal(proc, sig, jobs, late_request=True)
    assert late.status_code == 503 and late.headers["retry-after"] == "5"
    assert "shutting down" in late.json()["error"]["message"]
    assert results["a"] == ("ok", "length") and results["b"] == ("ok", "length")
    assert json.loads(results["raw"][-2][len("data: "):])["choices"][0]["finish_reason"] == "length"
    assert results["raw"][-1] == "data: [DONE]"
    assert rc == 0, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    assert "shutting down" in output and "drain timeout" not in output and "stopped" in output


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_past_the_drain_timeout_ends_streams_with_an_error_event(serve_dirs, sig):
    """Streams still running when the drain timeout (0 here) ends get an error event and [DONE]: the openai client
    raises APIError with the message, not a connection error; the process exits 0 without a traceback."""
    proc = _server(serve_dirs, drain_timeout=0.0)
    jobs = [("a", "openai", 1800), ("b", "openai", 1800), ("raw", "raw", 1800)]
    results, _, rc, output = _streams_then_signal(proc, sig, jobs, late_request=False)
    for key in ("a", "b"):
        assert results[key][0] == "APIError" and "the server is shutting down" in results[key][1], results[key]
    raw = results["raw"]
    assert json.loads(raw[-2][len("data: "):])["error"]["message"] == "the server is shutting down"
    assert raw[-1] == "data: [DONE]"
    assert rc == 0, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    assert "drain timeout: ended" in output


def test_shutdown_when_idle_exits_at_once_with_0(serve_dirs):
    proc = _server(serve_dirs, drain_timeout=30.0, delay=0.0)
    try:
        proc.proc.send_signal(signal.SIGTERM)
        rc = proc.proc.wait(30)
    finally:
        output = proc.output()
        proc.close()
    assert rc == 0 and "Traceback" not in output and "stopped" in output
