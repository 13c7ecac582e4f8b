"""Where a CuMA adapter's serving time goes, next to a LoRA adapter's: one decode step and one choice request.

    python benchmarks/profile_methods.py [--steps 32] [--top 18] [--json PATH]

In process, no HTTP: SmolLM2-135M-Instruct with (a) LoRA r=8 on q_proj/v_proj and (b) CuMA (8 experts, top-2, r=8,
router 256 wide, fast conditioning: router_input_norm="balanced", router_token_init_scale=0.1,
router_profile_center="train" fitted on the eight benchmark profiles), both untrained with a random B
(``init_weights=False``) so every expert and router does its full work. The model calls are the serving engine's
(``cuma.serve.engine``): a prefill with ``use_cache`` and ``logits_to_keep=1``, then one-token decode steps with the
KV cache; the choice request is ``cuma.evaluate.scoring.score_prompts`` on one prompt, as ``/v1/choice`` runs it.

Prints medians of wall time per decode step (batch 1 and 8) and per choice request, the CuMA / LoRA ratios, the
top functions by cumulative time (cProfile) and the top operators by self CPU time (torch profiler) of one decode
step of each adapter, and the count of operator calls per step.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _serve_process import build_adapter  # noqa: E402
PROFILE_TEXTS = [
    "Country: Egypt. Age: 25-34 years old. Gender: Female. Religion: Muslim.",
    "Country: Sweden. Age: 55-64 years old. Gender: Male. Religion: None.",
    "Country: Japan. Age: 35-44 years old. Gender: Female. Religion: Buddhist.",
    "Country: Brazil. Age: 18-24 years old. Gender: Male. Religion: Roman Catholic.",
    "Country: United States. Age: 45-54 years old. Gender: Female. Religion: Protestant.",
    "Country: Nigeria. Age: 25-34 years old. Gender: Male. Religion: Muslim.",
    "Country: India. Age: 65+ years old. Gender: Female. Religion: Hindu.",
    "Country: Germany. Age: 18-24 years old. Gender: Male. Religion: None.",
]


def build(method: str, profiles: torch.Tensor):
    """An untrained-but-complete adapter of ``method`` on a fresh SmolLM2 (random B, seed 0), eval mode."""
    return build_adapter(method, profiles).model.eval()


def engine_call(model, ids, mask, pos, cache, profiles):
    """The serving engine's model call (cuma.serve.engine.Engine._forward)."""
    kw = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "use_cache": True, "logits_to_keep": 1}
    if cache is not None:
        kw["past_key_values"] = cache
    if profiles is not None:
        kw["profile_embeds"] = profiles
    out = model(**kw)
    return out.logits[:, -1, :], out.past_key_values


def decode_session(model, tok, rows: int, prompt_len: int, profiles):
    """Prefill ``rows`` prompts of ``prompt_len`` tokens, return a closure running one decode step (cache grows)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 5000, (rows, prompt_len), generator=g)
    mask = torch.ones_like(ids)
    pos = (mask.cumsum(-1) - 1)
    with torch.inference_mode():
        logits, cache = engine_call(model, ids, mask, pos, None, profiles)
    state = {"mask": mask, "next": pos[:, -1:] + 1, "last": logits.argmax(-1, keepdim=True), "cache": cache}

    def step():
        state["mask"] = torch.cat([state["mask"], state["mask"].new_ones((rows, 1))], dim=1)
        with torch.inference_mode():
            logits, state["cache"] = engine_call(model, state["last"], state["mask"], state["next"], state["cache"],
                                                 profiles)
        state["next"] = state["next"] + 1
        state["last"] = logits.argmax(-1, keepdim=True)
        return state["last"]

    return step


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def choice_request(model, tok, profiles):
    from cuma.evaluate.scoring import score_prompts

    prompt = tok.apply_chat_template(
        [{"role": "system", "content": "About the user: " + PROFILE_TEXTS[0]},
         {"role": "user", "content": "How important is family in your life?\nA. Very important\nB. Rather important\n"
                                     "C. Not very important\nD. Not at all important\nAnswer with one letter."}],
        tokenize=False, add_generation_prompt=True) + "Answer:"
    letters = [[tok.encode(" " + x, add_special_tokens=False)[-1] for x in "ABCD"]]

    def run():
        with torch.inference_mode():
            return score_prompts(model, tok, [prompt], letters, batch_size=8,
                                 profile_rows=profiles[:1] if profiles is not None else None, progress=False)

    return run


def cprofile_top(fn, n: int, top: int) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        fn()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def torch_profile_top(fn, n: int, top: int) -> tuple[str, int]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            fn()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    calls = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    return table, calls // n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per adapter (median)")
    p.add_argument("--prompt-len", type=int, default=40)
    p.add_argument("--top", type=int, default=18)
    p.add_argument("--no-profile", action="store_true", help="timings only")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("CUMA_BENCH_THREADS", "2")))
    from cuma import models
    from cuma.encoder import ProfileEncoder

    _, tok = models.load_base_and_tokenizer("smollm2-135m")
    enc = ProfileEncoder()
    profiles = enc.encode(PROFILE_TEXTS).float()
    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "loadavg": os.getloadavg(),
               "threads": torch.get_num_threads(), "torch": torch.__version__}
    built = {m: build(m, profiles) for m in ("lora", "cuma")}
    for method, model in built.items():
        prof = profiles if method == "cuma" else None
        r = {}
        for rows in (1, 8):
            step = decode_session(model, tok, rows, args.prompt_len, prof[:rows] if prof is not None else None)
            for _ in range(3):
                step()
            r[f"decode_step_b{rows}_s"] = median_time(step, args.steps)
        choice = choice_request(model, tok, prof)
        choice()
        r["choice_1_s"] = median_time(choice, 9)
        if not args.no_profile:
            step = decode_session(model, tok, 1, args.prompt_len, prof[:1] if prof is not None else None)
            step()
            r["cprofile_decode"] = cprofile_top(step, 8, args.top)
            r["torch_ops_decode"], r["aten_calls_per_step"] = torch_profile_top(step, 8, args.top)
            r["cprofile_choice"] = cprofile_top(choice, 3, args.top)
        results[method] = r
    print(f"\n{results['date']}, {results['threads']} threads, load average {results['loadavg']}")
    print("| measure | LoRA | CuMA | CuMA / LoRA |\n|---|---:|---:|---:|")
    for key in ("decode_step_b1_s", "decode_step_b8_s", "choice_1_s"):
        lo, cu = results["lora"][key], results["cuma"][key]
        print(f"| {key} | {lo * 1000:.1f} ms | {cu * 1000:.1f} ms | {cu / lo:.2f}x |")
    if not args.no_profile:
        for method in ("lora", "cuma"):
            r = results[method]
            print(f"\n===== {method}: aten calls per decode step {r['aten_calls_per_step']}")
            print(r["torch_ops_decode"])
            print(r["cprofile_decode"])
            print(f"----- {method}: choice request (cProfile)")
            print(r["cprofile_choice"])
    if args.json:
        from cuma.runinfo import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
