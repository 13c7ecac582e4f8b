"""Load benchmark of `cuma serve`: bounded concurrent clients on loopback, batching vs no batching.

    python benchmarks/bench_serve.py [--quick] [--adapter DIR] [--json PATH] [--clients 1,4,16,64]

Serves SmolLM2-135M-Instruct with a CuMA adapter (N=8, k=2, r=8, q_proj+v_proj, 384-d profiles from the default
all-MiniLM-L6-v2 encoder). Without ``--adapter`` the adapter is built here with a random B initialisation
(``init_weights=False``, seed 0): untrained, but every expert and router does its full work, so the cost is that of a
trained one. Two servers run as subprocesses on 127.0.0.1, one with ``--max-batch-size 16`` (batched), one with
``--max-batch-size 1`` (unbatched), everything else the same; each concurrency level runs on the batched server and
then on the unbatched one, so that the two figures of a level see about the same load from other processes.

Clients are asyncio tasks in this process, each in a closed loop (send, wait for the whole answer, send the next);
``C`` clients are at most ``C`` requests in flight. Each request is a chat completion with one of eight profiles
(mixed in every batch), one of eight questions, greedy, ``max_tokens`` new tokens with ``ignore_eos`` so that every
answer has the same length and tokens/s compare. Reported per level: completion tokens/s over the level's wall time,
p50 / p99 of the request latency, errors; then batched / unbatched ratios. Targets (issue 14): at 16 clients,
batched >= 3x the tokens/s of unbatched; 64 clients x 8 requests complete with zero errors.

The unbatched server serves one request at a time whatever the concurrency, so its levels run fewer requests
(``--unbatched-requests``, per client) to keep the run short; tokens/s is a rate and latency percentiles are per
request, so both stay comparable. On a shared machine other processes slow both servers; the load average at the
start and end is printed and recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _serve_process import PROFILES, ServeProcess  # noqa: E402

QUESTIONS = [
    "How important is family in your life?",
    "Should children be taught obedience at home?",
    "Is it ever justified to cheat on taxes?",
    "How much do you trust your neighbours?",
    "What do you think about people of another religion living next door?",
    "Is work a duty towards society?",
    "How important is God in your life?",
    "Should men have more right to a job than women when jobs are scarce?",
]


def build_adapter(out: Path) -> Path:
    import torch

    from cuma import methods, models

    base = models.load_base("smollm2-135m")
    torch.manual_seed(0)
    built = methods.build("cuma", base, profile_dim=384, init_weights=False)
    methods.save(built, out)
    return out


async def _level(url: str, clients: int, per_client: int, max_tokens: int) -> dict:
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    tokens = 0
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)

    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(1800.0), limits=limits) as http:
        async def client(cid: int) -> None:
            nonlocal tokens
            for k in range(per_client):
                i = cid * per_client + k
                body = {"model": "bench", "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                        "profile": PROFILES[(i * 3 + cid) % len(PROFILES)], "max_tokens": max_tokens,
                        "temperature": 0, "ignore_eos": True}
                t = time.perf_counter()
                try:
                    r = await http.post("/v1/chat/completions", json=body)
                    if r.status_code != 200:
                        errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
                        continue
                    tokens += r.json()["usage"]["completion_tokens"]
                    latencies.append(time.perf_counter() - t)
                except Exception as err:  # noqa: BLE001 - counted, reported
                    errors.append(f"{type(err).__name__}: {err}")

        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        wall = time.perf_counter() - t0
        health = (await http.get("/health")).json()
    latencies.sort()

    def pct(q: float) -> float:
        if not latencies:
            return float("nan")
        return latencies[min(len(latencies) - 1, max(0, round(q * (len(latencies) - 1))))]

    return {"clients": clients, "requests": clients * per_client, "ok": len(latencies), "errors": len(errors),
            "error_samples": errors[:3], "wall_s": round(wall, 2), "tokens": tokens,
            "tokens_per_s": round(tokens / wall, 2), "p50_s": round(pct(0.50), 3), "p99_s": round(pct(0.99), 3),
            "max_batch_seen": health.get("max_batch_seen")}


def _report(name: str, r: dict) -> None:
    print(f"  {name:<9} clients {r['clients']:>2}: {r['tokens_per_s']:7.1f} tok/s  p50 {r['p50_s']:.2f} s  "
          f"p99 {r['p99_s']:.2f} s  {r['ok']}/{r['requests']} ok  (max batch seen {r['max_batch_seen']})", flush=True)


def run_pair(adapter: Path, batch: int, levels: list[int], per_batched: int, per_unbatched: dict, max_tokens: int,
             threads, logs: Path) -> tuple[list, list]:
    """Both servers up at once (an idle one costs no CPU); at each level the batched run, then the unbatched one,
    so that the two figures of a level see about the same load from other processes."""
    batched_srv = ServeProcess(adapter, logs / "batched.log", max_batch=batch, threads=threads, startup_timeout=600)
    try:
        unbatched_srv = ServeProcess(adapter, logs / "unbatched.log", max_batch=1, threads=threads, startup_timeout=600)
    except Exception:
        batched_srv.close()
        raise
    try:
        for srv in (batched_srv, unbatched_srv):
            asyncio.run(_level(srv.url, 2, 1, 4))  # warm-up (first calls allocate, encoder caches)
        batched, unbatched = [], []
        for c in levels:
            b = asyncio.run(_level(batched_srv.url, c, per_batched, max_tokens))
            _report("batched", b)
            u = asyncio.run(_level(unbatched_srv.url, c, per_unbatched[c], max_tokens))
            _report("unbatched", u)
            batched.append(b)
            unbatched.append(u)
        return batched, unbatched
    finally:
        batched_srv.close()
        unbatched_srv.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--adapter", default=None, help="CuMA adapter folder (default: build one with random B)")
    p.add_argument("--clients", default="1,4,16,64")
    p.add_argument("--requests", type=int, default=8, help="requests per client, batched server (default 8)")
    p.add_argument("--unbatched-requests", default="4,2,1,1",
                   help="requests per client at each level, unbatched server (default 4,2,1,1)")
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens per answer (default 32)")
    p.add_argument("--batch", type=int, default=16, help="--max-batch-size of the batched server (default 16)")
    p.add_argument("--threads", type=int, default=None, help="server torch threads (default: its own default)")
    p.add_argument("--quick", action="store_true", help="levels 1,4,16, 2 requests per client, 16 tokens")
    p.add_argument("--json", default=None, help="write every figure and the environment to this file")
    args = p.parse_args()
    levels = [int(x) for x in args.clients.split(",")]
    unb = [int(x) for x in args.unbatched_requests.split(",")]
    if len(unb) < len(levels):
        unb += [unb[-1]] * (len(levels) - len(unb))
    if args.quick:
        levels, args.requests, args.max_tokens, unb = [c for c in levels if c <= 16], 2, 16, [2, 1, 1, 1]
    start = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "loadavg": os.getloadavg(),
             "command": " ".join(["python", *sys.argv])}
    print(f"cuma serve load benchmark, {start['date']}, load average {start['loadavg']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(args.adapter) if args.adapter else build_adapter(Path(tmp) / "cuma-random-b")
        print(f"batched (--max-batch-size {args.batch}) and unbatched (--max-batch-size 1), level by level:",
              flush=True)
        batched, unbatched = run_pair(adapter, args.batch, levels, args.requests, dict(zip(levels, unb)),
                                      args.max_tokens, args.threads, Path(tmp))
    end_load = os.getloadavg()
    print(f"\nSmolLM2-135M + CuMA ({'adapter ' + args.adapter if args.adapter else 'random B'}), "
          f"{args.max_tokens} tokens per answer, load average {start['loadavg']} -> {end_load}\n")
    head = ("clients", "tok/s batched", "tok/s unbatched", "ratio", "p50 b / u (s)", "p99 b / u (s)",
            "p50 ratio", "errors b / u", "requests b / u")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---:" for _ in head) + "|")
    rows = []
    for b, u in zip(batched, unbatched):
        ratio = b["tokens_per_s"] / u["tokens_per_s"] if u["tokens_per_s"] else float("nan")
        lat = u["p50_s"] / b["p50_s"] if b["p50_s"] else float("nan")
        rows.append({"clients": b["clients"], "batched": b, "unbatched": u, "throughput_ratio": round(ratio, 2),
                     "p50_speedup": round(lat, 2)})
        print(f"| {b['clients']} | {b['tokens_per_s']:.1f} | {u['tokens_per_s']:.1f} | {ratio:.2f}x | "
              f"{b['p50_s']:.2f} / {u['p50_s']:.2f} | {b['p99_s']:.2f} / {u['p99_s']:.2f} | {lat:.2f}x | "
              f"{b['errors']} / {u['errors']} | {b['requests']} / {u['requests']} |")
    at16 = next((r for r in rows if r["clients"] == 16), None)
    at64 = next((r for r in rows if r["clients"] == 64), None)
    verdicts = {}
    if at16:
        verdicts["16 clients >= 3x unbatched"] = at16["throughput_ratio"] >= 3.0
    if at64:
        verdicts["64 clients x 8 requests, zero errors"] = (at64["batched"]["errors"] == 0
                                                           and at64["batched"]["requests"] == 64 * 8)
    print()
    for name, ok in verdicts.items():
        print(f"target {name}: {'met' if ok else 'NOT met'}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"start": start, "loadavg_end": end_load, "max_tokens": args.max_tokens,
                                               "adapter": args.adapter or "random B (init_weights=False, seed 0)",
                                               "rows": rows, "targets": verdicts}, indent=2))
    return 0 if all(verdicts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
