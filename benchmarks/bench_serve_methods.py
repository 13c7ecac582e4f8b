"""The same `cuma serve` with a LoRA adapter and with a CuMA adapter, side by side: latency and throughput ratios.

    python benchmarks/bench_serve_methods.py [--repeats 7] [--before-src DIR] [--json PATH] [--device cpu|cuda]

SmolLM2-135M-Instruct, r=8 on q_proj/v_proj for both adapters, built here from ``cuma.methods.build`` with a random B
(``init_weights=False``, seed 0) and saved (untrained, but every expert and router does its full work). CuMA: 8
experts, top-2, router 256 wide, fast conditioning (``router_input_norm="balanced"``, ``router_token_init_scale=0.1``,
``router_profile_center="train"``, the centre fitted on the benchmark's eight profiles). Each server is a subprocess
``python -m cuma.cli serve --adapter DIR`` on 127.0.0.1; all servers are up at once and every measurement visits them
in turn, repeat by repeat, so that they see about the same load from other processes.

Measured per server (medians over ``--repeats``):

* chat: one request at a time, greedy, 32 new tokens (``ignore_eos``): request latency;
* ``/v1/choice`` with 1 profile and with 8 profiles (one question, four options): request latency;
* 16 concurrent streams: 16 clients each sending one 32-token chat request at once: completion tokens/s.

Printed: the table of medians and the CuMA / LoRA ratios, against the targets of issue 33 (latency ratios <= 1.25,
16-stream tokens/s >= 0.8x LoRA). With ``--before-src DIR`` a third server runs CuMA from another source tree (e.g.
``git archive <commit> src | tar -x -C /tmp/before``): the same ratios before and after a change, in one run; the
``--step`` part then also times a CuMA training step and ``cuma eval``-style scoring throughput (``score_prompts``, 32
prompts, batch 16) in a subprocess per source tree, alternating, to show what else moved.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _serve_process import FAST, PROFILES, ServeProcess, build_adapter  # noqa: E402

QUESTION = "How important is family in your life?"
OPTIONS = ["Very important", "Rather important", "Not very important", "Not at all important"]
TARGET_LATENCY, TARGET_STREAMS = 1.25, 0.8


def build_adapters(out: Path) -> dict[str, Path]:
    from cuma import methods
    from cuma.encoder import ProfileEncoder
    from cuma.profiles import Profile

    enc = ProfileEncoder()
    rows = enc.encode([Profile(**p).to_text() for p in PROFILES]).float()
    paths = {}
    for name in ("lora", "cuma"):
        methods.save(build_adapter(name, rows), out / name)
        paths[name] = out / name
    return paths


def _chat_body(i: int, max_tokens: int) -> dict:
    return {"model": "bench", "messages": [{"role": "user", "content": QUESTION}], "profile": PROFILES[i % 8],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}


async def _timed(http, path: str, body: dict) -> tuple[float, dict]:
    t = time.perf_counter()
    r = await http.post(path, json=body)
    dt = time.perf_counter() - t
    if r.status_code != 200:
        raise RuntimeError(f"{path}: HTTP {r.status_code}: {r.text[:300]}")
    return dt, r.json()


async def measure(url: str, kind: str, i: int, max_tokens: int) -> float:
    """One measurement: seconds for a latency kind, completion tokens/s for 'streams16'."""
    import httpx

    limits = httpx.Limits(max_connections=24, max_keepalive_connections=24)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(1800.0), limits=limits) as http:
        if kind == "chat":
            return (await _timed(http, "/v1/chat/completions", _chat_body(i, max_tokens)))[0]
        if kind in ("choice1", "choice8"):
            n = 1 if kind == "choice1" else 8
            body = {"model": "bench", "question": QUESTION, "options": OPTIONS,
                    "profiles": [PROFILES[(i + j) % 8] for j in range(n)]}
            return (await _timed(http, "/v1/choice", body))[0]
        if kind == "streams16":
            t = time.perf_counter()
            outs = await asyncio.gather(*(_timed(http, "/v1/chat/completions", _chat_body(i + c, max_tokens))
                                          for c in range(16)))
            wall = time.perf_counter() - t
            return sum(o[1]["usage"]["completion_tokens"] for o in outs) / wall
    raise ValueError(kind)


KINDS = ("chat", "choice1", "choice8", "streams16")
LABELS = {"chat": "chat, greedy, {n} tokens, one request (s)", "choice1": "/v1/choice, 1 profile (s)",
          "choice8": "/v1/choice, 8 profiles (s)", "streams16": "16 concurrent streams (tokens/s)"}


# ------------------------------------------------------------------------------------ training step and scoring

CHILD = r'''
import json, statistics, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
from cuma import methods, models
from cuma.evaluate.scoring import score_prompts
from cuma.tuners.cuma.model import fit_profile_center
FAST = json.loads(sys.argv[2])
base, tok = models.load_base_and_tokenizer("smollm2-135m")
torch.manual_seed(0)
built = methods.build("cuma", base, profile_dim=384, init_weights=False, **FAST)
model = built.model
g = torch.Generator().manual_seed(0)
prof = torch.nn.functional.normalize(torch.randn(8, 384, generator=g), dim=-1)
fit_profile_center(model, prof)
out = {}
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
ids = torch.randint(100, 5000, (4, 64), generator=g)
def step():
    opt.zero_grad()
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, profile_embeds=prof[:4]).loss
    import cuma
    aux = cuma.pop_balance_loss(model)
    (loss + aux if aux is not None else loss).backward()
    opt.step()
step()
t = []
for _ in range(4):
    s = time.perf_counter(); step(); t.append(time.perf_counter() - s)
out["train_step_s"] = statistics.median(t)
model.eval()
prompts = [f"Question {i}: how important is family in your life? A. Very B. Rather C. Not very D. Not at all. Answer:"
           for i in range(32)]
letters = [[tok.encode(" " + x, add_special_tokens=False)[-1] for x in "ABCD"]] * 32
rows = prof[torch.arange(32) % 8]
score_prompts(model, tok, prompts[:16], letters[:16], batch_size=16, profile_rows=rows[:16], progress=False)
t = []
for _ in range(3):
    s = time.perf_counter()
    score_prompts(model, tok, prompts, letters, batch_size=16, profile_rows=rows, progress=False)
    t.append(time.perf_counter() - s)
out["scoring_prompts_per_s"] = 32 / statistics.median(t)
print("RESULT " + json.dumps(out))
'''


def child_run(src: Path | None, threads: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if src is not None:
        env["PYTHONPATH"] = str(src) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", CHILD, str(threads), json.dumps(FAST)], capture_output=True,
                          text=True, env=env, timeout=1800)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"step/scoring child failed ({done.returncode}): {done.stderr[-1500:]}")
    return json.loads(line[len("RESULT "):])


# ------------------------------------------------------------------------------------------------------ main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=7, help="measurements per kind and server (median; default 7)")
    p.add_argument("--stream-repeats", type=int, default=3, help="16-stream measurements per server (default 3)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--before-src", default=None, help="a source tree of cuma (its src/ folder) to serve CuMA from "
                                                      "as well: the 'before' column")
    p.add_argument("--step", action="store_true", help="with --before-src: also time a training step and scoring "
                                                       "throughput, before vs after")
    p.add_argument("--threads", type=int, default=None, help="server torch threads (default: the server's own)")
    p.add_argument("--device", default="cpu", help="server device (cpu, cuda)")
    p.add_argument("--json", default=None, help="write every figure and the environment to this file")
    args = p.parse_args()
    before = Path(args.before_src).resolve() if args.before_src else None
    start = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "loadavg": os.getloadavg(),
             "command": " ".join(["python", *sys.argv]), "cpu": _cpu_name(), "device": args.device}
    print(f"cuma serve, LoRA vs CuMA, {start['date']}, {start['cpu']}, load average {start['loadavg']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        adapters = build_adapters(tmp)
        plan = [("lora", adapters["lora"], None), ("cuma", adapters["cuma"], None)]
        if before is not None:
            plan.append(("cuma-before", adapters["cuma"], before))
        servers = []
        try:
            for name, adapter, src in plan:
                servers.append(ServeProcess(adapter, tmp / f"{name}.log", threads=args.threads, device=args.device, src=src,
                                            name=f"server {name}"))
            for s in servers:  # warm-up: first calls allocate, the encoder caches the profiles
                for kind in KINDS[:3]:
                    asyncio.run(measure(s.url, kind, 0, 4))
            samples = {s.name: {k: [] for k in KINDS} for s in servers}
            for rep in range(args.repeats):
                for kind in KINDS[:3]:
                    for s in servers:
                        samples[s.name][kind].append(asyncio.run(measure(s.url, kind, rep, args.max_tokens)))
                print(f"  repeat {rep + 1}/{args.repeats} done", flush=True)
            for rep in range(args.stream_repeats):
                for s in servers:
                    samples[s.name]["streams16"].append(asyncio.run(measure(s.url, "streams16", rep,
                                                                            args.max_tokens)))
        finally:
            for s in servers:
                s.close()
    med = {name: {k: statistics.median(v) for k, v in kinds.items()} for name, kinds in samples.items()}
    cols = [n for n in ("lora", "cuma", "cuma-before") if n in med]
    print(f"\nload average {start['loadavg']} -> {os.getloadavg()}; medians of {args.repeats} "
          f"({args.stream_repeats} for the streams)\n")
    head = ["request"] + cols + ["CuMA / LoRA"] + (["before: CuMA / LoRA"] if before else [])
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    ratios, ratios_before = {}, {}
    for k in KINDS:
        lo = med["lora"][k]
        # latency: CuMA / LoRA (lower is better); throughput: CuMA / LoRA tokens/s (higher is better)
        ratios[k] = med["cuma"][k] / lo
        if before:
            ratios_before[k] = med["cuma-before"][k] / lo
        cells = [f"{med[c][k]:.3f}" if k != "streams16" else f"{med[c][k]:.1f}" for c in cols]
        row = [LABELS[k].format(n=args.max_tokens)] + cells + [f"{ratios[k]:.2f}x"] + ([f"{ratios_before[k]:.2f}x"] if before else [])
        print("| " + " | ".join(row) + " |")
    verdicts = {f"{k} latency ratio <= {TARGET_LATENCY}": ratios[k] <= TARGET_LATENCY for k in KINDS[:3]}
    verdicts[f"16-stream tokens/s >= {TARGET_STREAMS}x LoRA"] = ratios["streams16"] >= TARGET_STREAMS
    print()
    for name, ok in verdicts.items():
        print(f"target {name}: {'met' if ok else 'NOT met'}")
    record = {"start": start, "loadavg_end": os.getloadavg(), "max_tokens": args.max_tokens, "repeats": args.repeats,
              "stream_repeats": args.stream_repeats, "samples": samples, "medians": med,
              "ratios_cuma_over_lora": ratios, "ratios_before": ratios_before or None, "targets": verdicts,
              "before_src": str(before) if before else None, "cuma_options": FAST}
    if args.json:  # the serving figures first: a failure of the step part below must not lose them
        from cuma.runinfo import atomic_write_json

        atomic_write_json(args.json, record)
    other = None
    if before is not None and args.step:
        threads = args.threads or 2
        runs = {"after": [], "before": []}
        try:
            for _ in range(2):  # alternating, so that both trees see the same load
                runs["before"].append(child_run(before, threads))
                runs["after"].append(child_run(None, threads))
        except Exception as err:  # noqa: BLE001 - reported and recorded; the serving figures are already written
            print(f"step/scoring part failed: {err}")
            record["step_and_scoring_error"] = str(err)
            runs = {k: v for k, v in runs.items() if v}
        other = ({tree: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for tree, rs in runs.items()}
                 if len(runs) == 2 else None)
    if other is not None:
        print(f"\nCuMA training step (batch 4 x 64, AdamW) and scoring (score_prompts, 32 prompts, batch 16), "
              f"{args.threads or 2} threads, medians of 2 runs")
        print("| measure | before | after | after / before |\n|---|---:|---:|---:|")
        for k in other["after"]:
            b, a = other["before"][k], other["after"][k]
            print(f"| {k} | {b:.3f} | {a:.3f} | {a / b:.2f}x |")
    if args.json:
        record["step_and_scoring"] = other
        atomic_write_json(args.json, record)
    return 0 if all(verdicts.values()) else 1


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
