"""How much of token-row fact tracing's gap to BM25 is the projection's noise?

Token rows are compressed per tracked module. The factored projection (LoGra, the default) maps
a module's gradient Σ_s δ_s a_sᵀ to (P_out δ_s)(P_in a_s)ᵀ summed over positions, with
k_out·k_in = dim, so an inner product of two rows is estimated through k_out and k_in random
directions per factor: at 256 = 16 × 16 each factor's dot product carries a relative error of
about 1/√16. A stating document's match with a question differs from other documents' by a
small part of the whole inner product (the entity in the context, against the answer word and
the question's frame, `fact_tracing_variants.py`), so that error can reorder the top ten. This
script builds the token-unit index of `fact_tracing.py`'s corpus and model at several
projections (factored 256 and 1024 per module, dense Gaussian 256) and scores the
same held-out questions with token-row cosine and TrackStar, beside BM25: Recall@10, MRR, and the
recall of the stating documents that name the entity first (those retraining says matter,
`fact_tracing_reversal.py`) and the value first.

    python benchmarks/fact_tracing_projection.py      # ~30 min on 2 cores once fact_tracing.py has run (model cached)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import fact_tracing
import numpy as np
import torch
from fact_tracing_variants import metrics

from headwater import BuildConfig, ProjectionConfig, build_index
from headwater.demos.facts import prepare
from headwater.methods import BM25, Cosine, TrackStar

PROJECTIONS = ("factored 256", "factored 1024", "dense 256")


def recalls(scores: np.ndarray, relevant: list[list[int]], value_first: list[list[bool]]) -> dict:
    """Recall@10, MRR, and Recall@10 of the stating documents by which they name first, from
    record scores [n, q] (`fact_tracing_variants.metrics` with each order as its flags)."""
    first = metrics(scores, relevant, [[not v for v in vf] for vf in value_first])
    return {
        "recall": first["recall"],
        "mrr": first["mrr"],
        "entity first": first["entity_first"],
        "value first": metrics(scores, relevant, value_first)["entity_first"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--queries", type=int, default=160)
    p.add_argument("--projections", nargs="+", default=list(PROJECTIONS), help="'factored N' or 'dense N' (per module)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fact_tracing_projection.json")
    fact_tracing.kernel_options(p)
    args = p.parse_args()
    fact_tracing.portable_or_exit(args)
    torch.set_num_threads(2)
    model_dir, docs, questions = prepare(args.workdir, fact_tracing.HardConfig(seed=args.seed), corpus=fact_tracing.hard_corpus)
    questions, qfile, relevant = fact_tracing.asked_questions(args, docs, questions)
    value_first = fact_tracing.value_first(docs, questions, relevant)

    results = {"BM25": recalls(BM25().fit(docs).score(str(qfile)).values, relevant, value_first)}
    timings = args.workdir / "projection_build_seconds.json"  # a cached index keeps the time it took to build
    build_seconds = json.loads(timings.read_text()) if timings.exists() else {}
    for spec in args.projections:
        kind, dim = spec.split()
        path = args.workdir / f"index-token-{kind}-{dim}"
        cached = (path / "manifest.json").exists()
        t = time.time()
        config = BuildConfig(
            model=str(model_dir),
            data=str(args.workdir / "train.jsonl"),
            projection=ProjectionConfig(kind=kind, dim=int(dim), seed=args.seed),
            batch_size=16,
            unit="token",
        )
        index = build_index(path, config=config, resume=True)
        if not cached:
            build_seconds[spec] = time.time() - t
            timings.write_text(json.dumps(build_seconds))
        build_s = build_seconds.get(spec, float("nan"))
        size = sum(f.stat().st_size for f in index.path.rglob("*") if f.is_file())
        for name, method in (("cosine", Cosine), ("TrackStar", TrackStar)):
            t = time.time()
            r = recalls(method().fit(index).score(str(qfile)).values, relevant, value_first)
            results[f"{name}, token rows, {spec}"] = r | {"build seconds": build_s, "score seconds": time.time() - t, "index GB": size / 1e9}
            print(f"{name}, {spec}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()), flush=True)

    lines = [
        f"{len(docs)} documents, {len(questions)} held-out questions; token-row rows stored as float16",
        "",
        "| method | projection per module | Recall@10 | MRR | entity stated first | value stated first | build s | score s | index GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        method, _, spec = name.partition(", token rows, ")
        cost = f"{r['build seconds']:.0f} | {r['score seconds']:.0f} | {r['index GB']:.2f}" if spec else " | | "
        lines.append(f"| {method} | {spec} | {r['recall']:.3f} | {r['mrr']:.3f} | {r['entity first']:.3f} | {r['value first']:.3f} | {cost} |")
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results, "table": text}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
