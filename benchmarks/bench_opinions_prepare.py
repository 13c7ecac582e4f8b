"""Time and memory of ``cuma data opinions`` on GlobalOpinionQA-shaped files (issue 31's target: a 5,000-cell,
1,300-question file in seconds, memory proportional to the cells).

Writes synthetic files in GlobalOpinionQA's published layout (130 countries; about 30% of the questions asked in one
country, the rest in 2-10, as in the public copy) at 1x and 10x the cells, then runs ``prepare_opinions`` on each
(``--split cell``, no embeddings: the encoder's time is separate and per group, not per cell) and reports wall time,
the peak of Python allocations (tracemalloc, a second run) and the bytes per cell, side by side.

    PYTHONPATH=src python benchmarks/bench_opinions_prepare.py [--cells 5000] [--questions 1300] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np


def write_goqa(path: Path, cells: int, questions: int, countries: int = 130, seed: int = 0) -> int:
    """A GlobalOpinionQA-layout CSV with about ``cells`` cells over ``questions`` questions; returns the cell count."""
    import csv

    rng = np.random.default_rng(seed)
    names = [f"Country {i:03d}" for i in range(countries)] + ["Country 000 (Non-national sample)"]
    single = int(0.3 * questions)
    per_q = np.ones(questions, dtype=int)
    rest = cells - single
    per_q[single:] = np.maximum(2, rng.multinomial(rest - 2 * (questions - single),
                                                   np.ones(questions - single) / (questions - single)) + 2)
    total = 0
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["question", "selections", "options", "source"])
        for q in range(questions):
            k = int(rng.integers(2, 6))
            options = [f"Option {j}, variant {q % 7}" for j in range(k - 1)] + ["Don't know"]
            chosen = rng.choice(len(names), size=min(int(per_q[q]), len(names)), replace=False)
            sel = {names[c]: (rng.dirichlet(np.ones(k))).tolist() for c in chosen}
            total += len(sel)
            w.writerow([f"Synthetic question {q}: how do you feel about topic {q}?",
                        "defaultdict(<class 'list'>, " + repr(sel) + ")", repr(options), "GAS" if q % 2 else "WVS"])
    return total


def measure(path: Path, out: Path) -> dict:
    from cuma.data.opinion_readers import prepare_opinions

    def run():
        return prepare_opinions("globalopinionqa", path, out, split="cell", encoder=None, test_fraction=0.2,
                                valid_fraction=0.1, overwrite=True)

    t0 = time.perf_counter()
    manifest = run()
    seconds = time.perf_counter() - t0  # timed without tracemalloc, which slows allocation-heavy code several-fold
    tracemalloc.start()
    run()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    cells = sum(manifest["counts"]["cells"].values())
    return {"cells": cells, "seconds": round(seconds, 3),
            "peak_mib": round(peak / 2**20, 2), "peak_bytes_per_cell": int(peak / cells),
            "file_mib": round(path.stat().st_size / 2**20, 2), "skipped": manifest["skipped"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=5000)
    ap.add_argument("--questions", type=int, default=1300)
    ap.add_argument("--out", default=None, help="write the rows as JSON here too")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scale in (1, 10):
            path = Path(tmp) / f"goqa_{scale}.csv"
            n = write_goqa(path, args.cells * scale, args.questions * scale)
            row = measure(path, Path(tmp) / f"prepared_{scale}")
            row.update(scale=scale, questions=args.questions * scale, cells_written=n)
            rows.append(row)
            print(json.dumps(row))
    a, b = rows
    print(f"\n{'':>10} {'cells':>8} {'questions':>9} {'seconds':>8} {'peak MiB':>9} {'bytes/cell':>10}")
    for r in rows:
        print(f"{str(r['scale']) + 'x':>10} {r['cells']:>8} {r['questions']:>9} {r['seconds']:>8} {r['peak_mib']:>9} "
              f"{r['peak_bytes_per_cell']:>10}")
    print(f"10x / 1x: time {b['seconds'] / a['seconds']:.2f}, peak memory {b['peak_mib'] / a['peak_mib']:.2f} "
          f"(machine: {platform.processor() or platform.machine()}, {platform.python_version()})")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
