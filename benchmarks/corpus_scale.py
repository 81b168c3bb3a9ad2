"""Bin statistics at scale: rows/s and peak memory of `corpus_map` over on-disk stores of growing size.

A store of N synthetic gradient rows (float16, DIM dims) is written with the library's own
`ShardWriter`; records get labels from a 24 topic × 24 format taxonomy (576 joint bins, sizes
drawn from a skewed distribution); 4 benchmarks × 25 queries are scored against every row (dot
products) and aggregated per bin with the default 200 bootstrap replicates. Each size runs in a
fresh process so its peak RSS is its own. Beside it, the raw limit: numpy reading the same
memory-mapped bytes and multiplying them by the queries.

    python benchmarks/corpus_scale.py [--rows 250000 500000 1000000] [--dim 64]

Prints a table and writes benchmarks/results/corpus_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from headwater.corpus import BinsConfig, Labels, corpus_map
from headwater.methods.base import Method, TrainingData
from headwater.store import GradientStore, ShardWriter, write_json, write_manifest

BENCHMARKS, QUERIES = 4, 25


class StoreDot(Method):
    """Dot products of a store's rows with fixed query rows [Q, dim] (no model needed)."""

    name = "dot"

    def __init__(self, store: GradientStore, q: torch.Tensor):
        from headwater.config import GradientConfig

        self.store, self.q, self.config = store, q, GradientConfig()

    def fit(self, train):
        n = self.store.manifest["data"]["records"]
        self.data = TrainingData(_Records(n), list(range(n)), [])
        return self

    def score_blocks(self, queries, measurement, by=None):
        for block in self.store.blocks(reuse=True):
            yield block.start, block.ids, block.rows @ self.q.T


class _Records:
    """Record texts for the example table, without holding N dicts."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"text": f"record {i}"}


def write_store(path: Path, n: int, dim: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    writer = ShardWriter(path, 0, dim, "float16", shard_rows=1 << 17, resume=False)
    for lo in range(0, n, 1 << 16):
        hi = min(n, lo + (1 << 16))
        rows = torch.from_numpy(rng.standard_normal((hi - lo, dim), dtype=np.float32))
        writer.add(rows, np.stack([np.arange(lo, hi), np.zeros(hi - lo, np.int64)], 1), hi)
    writer.close(n)
    header = {"dim": dim, "dtype": "float16", "segments": [{"name": "all", "start": 0, "stop": dim}], "data": {"records": n}, "world_size": 1}
    write_json(path / "config.json", {})
    write_manifest(path, header, 1)


def labels_for(n: int, seed: int = 0) -> Labels:
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(24, 0.5))
    q = rng.dirichlet(np.full(24, 0.5))
    topic = np.array([f"t{i:02d}" for i in range(24)])[rng.choice(24, n, p=p)]
    fmt = np.array([f"f{i:02d}" for i in range(24)])[rng.choice(24, n, p=q)]
    # Categorical columns, as a labels.parquet with dictionary-encoded columns reads back.
    return Labels(pd.DataFrame({"id": np.arange(n), "topic": pd.Categorical(topic), "format": pd.Categorical(fmt)}))


def child(n: int, dim: int, workdir: Path) -> dict:
    """One size, in this process: write, aggregate, measure."""
    path = workdir / f"store-{n}"
    t = time.perf_counter()
    write_store(path, n, dim)
    write_s = time.perf_counter() - t
    store = GradientStore(path, verify=False)
    labels = labels_for(n)
    q = torch.randn(BENCHMARKS * QUERIES, dim, generator=torch.Generator().manual_seed(1))
    benches = {f"b{i}": [{"id": j} for j in range(QUERIES)] for i in range(BENCHMARKS)}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    cmap = corpus_map(StoreDot(store, q).fit(None), benches, labels, BinsConfig(by=["topic", "format"], examples=0))
    bins_s = time.perf_counter() - t
    t = time.perf_counter()
    for block in store.blocks():
        (block.rows @ q.T).sum()
    raw_s = time.perf_counter() - t
    return {
        "rows": n,
        "dim": dim,
        "bins": int(sum(len(v["bins"]) for v in cmap.info["views"].values())),
        "write_s": write_s,
        "bins_s": bins_s,
        "rows_per_s": n / bins_s,
        "raw_scoring_s": raw_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_bins_mb": rss_before / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[250_000, 500_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.dim, Path(args.workdir))))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.rows:
            cmd = [sys.executable, __file__, "--child", str(n), "--dim", str(args.dim), "--workdir", tmp]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"corpus_map over on-disk stores: {args.dim} dims float16, {BENCHMARKS}x{QUERIES} queries, 24x24 taxonomy, 200 bootstrap replicates")
    print(f"{'rows':>10} {'bins':>5} {'bins s':>8} {'rows/s':>10} {'raw scoring s':>14} {'ratio':>6} {'peak RSS MB':>12}")
    for r in results:
        ratio = r["bins_s"] / r["raw_scoring_s"]
        print(
            f"{r['rows']:>10,} {r['bins']:>5} {r['bins_s']:>8.1f} {r['rows_per_s']:>10,.0f} {r['raw_scoring_s']:>14.2f} {ratio:>6.1f} {r['peak_rss_mb']:>12.0f}"
        )
    out = Path(__file__).parent / "results" / "corpus_scale.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
