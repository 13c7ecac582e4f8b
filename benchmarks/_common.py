"""Shared helpers of the benchmark scripts: interleaved timing, medians and paired ratios, environment, JSON output.

The machines these run on are small and shared (2 cores, other processes competing), so every benchmark times its
variants side by side in one process: each repetition runs every variant once, in an order that rotates from one
repetition to the next, and the summary reports medians plus the median of the per-repetition (paired) ratios,
which cancels most of the slow drift caused by other load on the machine.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

import torch


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="short run (~20 s): fewer repetitions / smaller shapes")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the number of usable cores)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per variant (overrides the default)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up calls per variant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wait-load", type=float, default=None, metavar="L",
                   help="before starting, wait (up to 15 min) until the 1-minute load average is below L")
    return p


def wait_for_quiet(max_load: Optional[float], timeout_s: float = 900.0, poll_s: float = 10.0) -> Optional[float]:
    """Block until the 1-minute load average drops below ``max_load`` (or the timeout); returns the load seen."""
    if max_load is None:
        return None
    start = time.perf_counter()
    load = os.getloadavg()[0]
    while load >= max_load and time.perf_counter() - start < timeout_s:
        print(f"waiting for load < {max_load} (now {load:.2f})", flush=True)
        time.sleep(poll_s)
        load = os.getloadavg()[0]
    return load


def setup_torch(threads: Optional[int], seed: int = 0, wait_load: Optional[float] = None) -> int:
    wait_for_quiet(wait_load)
    n = threads or default_threads()
    torch.set_num_threads(n)
    torch.manual_seed(seed)
    return n


def time_interleaved(
    fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1, budget_s: Optional[float] = None
) -> dict[str, list[float]]:
    """Run every variant ``warmup`` times, then ``reps`` rounds in which every variant runs once (order rotating by
    round). Returns seconds per call for each variant, listed by round. ``budget_s`` stops early (after at least
    three complete rounds) when the timed part has taken longer than that."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    gc_was_enabled = gc.isenabled()
    try:
        for rnd in range(reps):
            order = names[rnd % len(names) :] + names[: rnd % len(names)]
            if rnd % 2:
                order = order[::-1]
            gc.collect()
            gc.disable()
            for name in order:
                t0 = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - t0)
            if gc_was_enabled:
                gc.enable()
            if budget_s is not None and rnd >= 2 and time.perf_counter() - start > budget_s:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def summarize(times: Sequence[float]) -> dict:
    t = sorted(times)
    q1, q3 = (statistics.quantiles(t, n=4)[0], statistics.quantiles(t, n=4)[2]) if len(t) >= 2 else (t[0], t[0])
    return {
        "n": len(t),
        "median_ms": 1e3 * statistics.median(t),
        "min_ms": 1e3 * t[0],
        "q1_ms": 1e3 * q1,
        "q3_ms": 1e3 * q3,
    }


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> dict:
    """Ratio of medians and median of the per-round ratios (rounds interleave the two variants)."""
    per_round = [a / b for a, b in zip(num, den)]
    return {
        "ratio_of_medians": statistics.median(num) / statistics.median(den),
        "median_paired_ratio": statistics.median(per_round),
        "min_ratio": min(num) / min(den),
    }


def environment(threads: int) -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import peft
        import transformers

        versions = {"transformers": transformers.__version__, "peft": peft.__version__}
    except ImportError:  # pragma: no cover
        versions = {}
    try:
        load = os.getloadavg()
    except OSError:  # pragma: no cover
        load = None
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host_cpu": cpu,
        "cores": default_threads(),
        "threads": threads,
        "torch": torch.__version__,
        **versions,
        "python": platform.python_version(),
        "loadavg_at_start": load,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec)."""
    cells = [[format(r[k], f) if isinstance(r.get(k), (int, float)) else str(r.get(k, "")) for k, _, f in columns] for r in rows]
    headers = [h for _, h, _ in columns]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths))))
    print("  ".join("-" * w for w in widths))
    for c in cells:
        print("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(c, widths))))


def write_json(path: Optional[str], payload: dict) -> None:
    if not path:
        return
    if isinstance(payload.get("env"), dict):
        try:
            payload["env"]["loadavg_at_end"] = os.getloadavg()
        except OSError:  # pragma: no cover
            pass
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"\nwrote {path}")


def verdict(value: float, target: float, lower_is_better: bool = True) -> str:
    ok = value <= target if lower_is_better else value >= target
    return "MET" if ok else "NOT MET"
