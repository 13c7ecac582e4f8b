import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cuma.evaluate.judges import (
    HTTPJudge,
    JudgeError,
    TransformersJudge,
    build_judge_messages,
    judge_pair,
    make_reward_fn,
    parse_verdict,
)


class Server:
    """A chat-completions server on 127.0.0.1: each request pops the next scripted action, or uses `default`."""

    def __init__(self):
        self.script = []
        self.default = ("ok", "A")
        self.requests = []
        self.lock = threading.Lock()
        server = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                    action = server.script.pop(0) if server.script else server.default
                kind, arg = action
                if kind == "sleep":
                    time.sleep(arg)
                    kind, arg = "ok", "A"
                if kind == "status":
                    self.send_response(arg)
                    self.end_headers()
                    self.wfile.write(b'{"error": "boom"}')
                    return
                if kind == "ok":
                    if callable(arg):
                        arg = arg(body)
                    payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": arg}}]}).encode()
                else:  # raw bytes
                    payload = arg
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def judge(server, tmp_path=None, **kw):
    kw.setdefault("backoff", 0.01)
    kw.setdefault("timeout", 2.0)
    return HTTPJudge(server.url, "judge-model", cache_dir=tmp_path, **kw)


def compare(j, a="answer one", b="answer two", profile="Country: Egypt."):
    return asyncio.run(j.compare([{"role": "user", "content": "hi"}], profile, a, b))


def test_parse_verdict():
    ok = {"A": "A", "B": "B", "tie": "tie", "Tie.": "tie", "**B**": "B", "<think>hmm A or B</think>\nB": "B",
          "Verdict: A": "A", "'A'": "A", "A.\nBecause it is better": "A", "draw": "tie", "Response B": "B"}
    for text, v in ok.items():
        assert parse_verdict(text) == v, text
    for text in ("", "Both are fine", "a good answer", "A good answer", "<think>A</think>", None, "C"):
        assert parse_verdict(text) is None, text


def test_prompt_carries_profile_and_answers():
    m = build_judge_messages([{"role": "user", "content": "Q?"}], "Country: Peru.", "ans-a", "ans-b")
    text = m[-1]["content"]
    assert "Country: Peru." in text and "ans-a" in text and "ans-b" in text and "Q?" in text
    assert "A, B, or tie" in m[0]["content"]


def test_request_key_and_verdict(server, monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-secret-123")
    j = judge(server, api_key_env="MY_JUDGE_KEY")
    assert compare(j) == "A"
    r = server.requests[0]
    assert r["path"] == "/v1/chat/completions" and r["auth"] == "Bearer sk-secret-123"
    assert r["body"]["model"] == "judge-model" and "Country: Egypt." in r["body"]["messages"][-1]["content"]
    assert "sk-secret" not in repr(j) and "sk-secret" not in json.dumps(j.describe())


@pytest.mark.parametrize("url, warns", [
    ("http://judge.example.org/v1", True),
    ("http://10.0.0.7:8000/v1", True),
    ("http://127.0.0.1:8080/v1", False),
    ("http://127.3.4.5/v1", False),
    ("http://localhost:8080/v1", False),
    ("http://[::1]:8080/v1", False),
    ("https://api.openai.com/v1", False),
])
def test_bearer_key_over_plain_http_to_another_host_warns(url, warns, monkeypatch):
    import warnings

    monkeypatch.setenv("MY_JUDGE_KEY", "sk-secret-123")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        j = HTTPJudge(url, "judge-model", api_key_env="MY_JUDGE_KEY")
        headers = j._headers()
        j._headers()
        j.close()
    assert headers["Authorization"] == "Bearer sk-secret-123"
    messages = [str(w.message) for w in caught if "plain http://" in str(w.message)]
    assert len(messages) == (1 if warns else 0)  # once per judge, not per request
    if warns:
        assert "MY_JUDGE_KEY" in messages[0] and "https://" in messages[0] and "sk-secret" not in messages[0]
    # no key in the environment: nothing is sent, nothing to warn about
    monkeypatch.delenv("MY_JUDGE_KEY")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        j = HTTPJudge(url, "judge-model", api_key_env="MY_JUDGE_KEY")
        assert "Authorization" not in j._headers()
        j.close()
    assert not [w for w in caught if "plain http://" in str(w.message)]


def test_5xx_then_success(server):
    server.script = [("status", 500), ("status", 503), ("ok", "B")]
    j = judge(server)
    assert compare(j) == "B"
    assert j.stats["retries"] == 2 and j.stats["requests"] == 3


def test_timeout_then_success_and_giving_up(server):
    server.script = [("sleep", 1.0), ("ok", "tie")]
    j = judge(server, timeout=0.3)
    assert compare(j) == "tie" and j.stats["timeouts"] == 1
    server.script = [("status", 502)] * 3
    j2 = judge(server, max_retries=2)
    with pytest.raises(JudgeError, match="after 3 attempts"):
        compare(j2)
    server.script = [("status", 401)]
    with pytest.raises(JudgeError, match="HTTP 401"):
        compare(judge(server))
    assert len(server.requests) == 2 + 3 + 1


def test_malformed_and_unparseable_are_counted(server):
    server.script = [("raw", b"not json"), ("raw", b'{"choices": []}'), ("ok", "I cannot decide")]
    j = judge(server)
    assert [compare(j) for _ in range(3)] == [None, None, None]
    assert j.stats["malformed"] == 2 and j.stats["unparseable"] == 3


def test_cache(server, tmp_path):
    j = judge(server, tmp_path / "cache")
    assert compare(j) == "A" and len(server.requests) == 1
    j2 = judge(server, tmp_path / "cache")
    server.default = ("ok", "B")
    assert compare(j2) == "A" and j2.stats["cache_hits"] == 1 and len(server.requests) == 1
    assert compare(j2, a="other answer") == "B" and len(server.requests) == 2  # different answers: new key
    server.script = [("ok", "???")]
    assert compare(j2, a="third") is None
    assert compare(j2, a="third") == "B"  # unparseable replies are not cached


def test_both_orders_and_concurrency(server):
    # the judge prefers whichever answer contains "good", wherever it is shown
    def pick(body):
        text = body["messages"][-1]["content"]
        a = text.split("Response A:\n")[1].split("\n\nResponse B:")[0]
        b = text.split("Response B:\n")[1].split("\n\n")[0]
        return "A" if "good" in a else "B" if "good" in b else "A"  # position bias otherwise

    server.default = ("ok", pick)
    j = judge(server, concurrency=3)

    async def run():
        return await asyncio.gather(
            judge_pair(j, "q", "p", "good answer", "meh"),
            judge_pair(j, "q", "p", "meh", "good answer"),
            judge_pair(j, "q", "p", "meh", "also meh"),
        )

    win, loss, tie = asyncio.run(run())
    assert win["outcome"] == "win" and win["consistent"] is True
    assert loss["outcome"] == "loss"
    assert tie["outcome"] == "tie" and tie["consistent"] is False  # position bias -> disagreement -> tie
    reward = make_reward_fn(j)
    out = asyncio.run(reward(["q", "q"], ["<think>x</think>good one", "meh"], reference=["meh", "good"],
                             profile_text=["p", "p"]))
    assert out == [1.0, 0.0]


def test_transformers_judge_tiny():
    from conftest import tiny_chat_tokenizer, tiny_llama

    for mode in ("logits", "generate"):
        j = TransformersJudge(tiny_llama(), tiny_chat_tokenizer(), mode=mode, max_new_tokens=2)
        v = asyncio.run(j.compare("hello?", "Country: Chile.", "one", "two"))
        assert v in ("A", "B", "tie", None)
        if mode == "logits":
            assert v is not None
        out = asyncio.run(judge_pair(j, "hello?", "", "one", "two"))
        assert out["outcome"] in ("win", "tie", "loss", "invalid")
