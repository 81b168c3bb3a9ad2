"""MAGIC's cost for q queries at once: one reverse pass carries all q adjoints (batched
vector-Jacobian products), against q separate passes.

The settings are benchmarks/lds.py's: a tabular MLP trained 10 epochs by SGD with momentum
(100 steps) and a tiny GPT-2 fine-tuned by AdamW (36 steps). For q = 1, 10, 100 queries: the
seconds of one batched `MAGIC.score`, and for q ≤ 10 of q one-query passes; the ratio to q = 1 is
the number to read (target: q = 100 at most 5× q = 1). Best of --repeats runs, after a warm-up.
Each scoring includes MAGIC's smoothness check (one more training run), as a user's does.

    python benchmarks/magic.py
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from lds import language_model, parser, tabular

import headwater as hw


def seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench(setting, queries: list[dict], repeats: int) -> dict:
    method = hw.MAGIC(setting.init(0), setting.task, hw.MagicConfig(run=setting.run)).fit(setting.train)
    method.score(queries[:1])  # warm-up
    out = {}
    for q in (1, 10, 100):
        batched = seconds(lambda: method.score(queries[:q], dtype=np.float64), repeats)
        row = {"batched": batched}
        if q <= 10:
            row["separate"] = seconds(lambda: [method.score(queries[j : j + 1]) for j in range(q)], 1)
        out[q] = row
    check = method.score(queries[:3], dtype=np.float64).values
    one_by_one = np.concatenate([method.score(queries[j : j + 1], dtype=np.float64).values for j in range(3)], 1)
    out["max_relative_difference"] = float(np.abs(check - one_by_one).max() / np.abs(one_by_one).max())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "magic.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    defaults = parser().parse_args(["--tab-targets", "100", "--lm-targets", "100"])  # lds.py's settings, 100 queries
    results = {}
    for name, make in (("tabular MLP", tabular), ("tiny GPT-2 fine-tune", language_model)):
        setting = make(defaults)
        results[name] = bench(setting, setting.targets, args.repeats)
    lines = ["| setting | q | one batched pass (s) | × q = 1 | q one-query passes (s) |", "|---|---|---|---|---|"]
    for name, r in results.items():
        for q in (1, 10, 100):
            sep = f"{r[q]['separate']:.2f}" if "separate" in r[q] else "—"
            lines.append(f"| {name} | {q} | {r[q]['batched']:.2f} | {r[q]['batched'] / r[1]['batched']:.2f} | {sep} |")
        lines.append(f"| {name} | batched vs one by one: max relative difference {r['max_relative_difference']:.1e} | | | |")
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": {n: {str(k): v for k, v in r.items()} for n, r in results.items()}, "table": text}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
