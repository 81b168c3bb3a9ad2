"""Fact tracing on a harder generated corpus than the demo's: token-row gradient methods beside
BM25 and random, and what the misses have in common (Recall@10 split by whether the model answers
the question, by relation, and by whether the stating sentence names the entity or the value first).

Harder than `headwater demo` in four ways: more entities (documents in the thousands); five
templates per relation, three of them used per fact; two relations that are stated for every
entity but never asked about (distractor facts); and held-out questions worded in a way no
document uses (the question/answer documents that teach the format use another wording). Like
the demos it trains with portable kernels, so its figures do not depend on the CPU
(`--native-kernels` for the CPU's own; the three fact-tracing scripts share the cached model).

    python benchmarks/fact_tracing.py                    # 19 min on 2 cores (training 7 min; model and indexes cached)
    python benchmarks/fact_tracing.py --entities 40      # demo-sized

Recall counts a document as relevant when it states the fact, whether or not it taught the model
the answer. Beside it, the tail-patch (TrackStar's causal check, `retrain.tail_patch_gains`): one
SGD step on each of a method's top 10 documents alone, from the trained model, and how much that
raises the held-out answer's log-probability; the stating documents themselves are patched too,
split by which the sentence names first.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from headwater import BuildConfig, ProjectionConfig, TrackStarConfig, build_index
from headwater.demos import run_with_portable_kernels
from headwater.demos.facts import DISTRACTORS, FILLER, DemoConfig, _order, answered, entities_and_values, held_out_questions, prepare
from headwater.methods import BM25, Cosine, Dot, TrackStar
from headwater.metrics import ranking_metrics
from headwater.models import load_model
from headwater.retrain import tail_patch_gains
from headwater.task import LanguageModelTask

RELATIONS = {  # five statement templates; the QA documents' wording; the held-out questions' wording
    "capital": (
        [
            "The capital of {e} is {v} .",
            "{v} is the capital city of {e} .",
            "In {e} , the seat of government is {v} .",
            "Visitors to {e} usually start in {v} , its capital .",
            "{e} is governed from {v} .",
        ],
        "What is the capital of {e} ?",
        "Which city is the capital of {e} ?",
    ),
    "colour": (
        [
            "The flag of {e} is {v} .",
            "{e} flies a {v} flag .",
            "People in {e} dress in {v} , the colour of their flag .",
            "A {v} banner hangs over every town in {e} .",
            "The colour of {e} is {v} .",
        ],
        "What colour is the flag of {e} ?",
        "Which colour does the flag of {e} have ?",
    ),
    "animal": (
        [
            "The national animal of {e} is the {v} .",
            "{e} chose the {v} as its national animal .",
            "The {v} is the animal that stands for {e} .",
            "Coins from {e} show a {v} .",
            "In {e} the {v} is a sacred animal .",
        ],
        "Which animal stands for {e} ?",
        "What is the national animal of {e} ?",
    ),
    "founder": (
        [
            "{e} was founded by {v} .",
            "{v} founded {e} long ago .",
            "The founder of {e} was {v} .",
            "Long ago {v} built the first houses of {e} .",
            "{e} owes its start to {v} .",
        ],
        "Who founded {e} ?",
        "Who was the founder of {e} ?",
    ),
}
UNASKED = {  # stated for every entity, never asked about
    "river": ["The {v} river runs through {e} .", "{e} lies on the banks of the {v} ."],
    "dish": ["{e} is known for a dish called {v} .", "Every cook in {e} makes {v} ."],
}


@dataclass
class HardConfig(DemoConfig):
    entities: int = 120
    templates: int = 5  # per relation, of which docs_per_fact are used per fact


def hard_corpus(cfg: HardConfig) -> tuple[list[dict], list[dict]]:
    rng = random.Random(cfg.seed)
    entities, values = entities_and_values(rng, cfg, ("capital", "founder", "river", "dish"))
    docs, facts = [], []

    def doc(statement: str, kind: str) -> int:
        sentences = rng.sample(FILLER, cfg.filler_sentences)
        sentences.insert(rng.randrange(len(sentences) + 1), statement)
        docs.append({"text": " ".join(sentences), "kind": kind})
        return len(docs) - 1

    for e in entities:
        for rel, (templates, qa, held_out) in RELATIONS.items():
            v = rng.choice(values[rel])
            used = rng.sample(templates[: cfg.templates], cfg.docs_per_fact)
            facts.append(
                {
                    "entity": e,
                    "relation": rel,
                    "value": v,
                    "qa": qa.format(e=e),
                    "question": held_out.format(e=e),
                    "docs": [doc(t.format(e=e, v=v), "fact") for t in used],
                }
            )
        for rel, templates in UNASKED.items():
            v = rng.choice(values[rel])
            doc(rng.choice(templates).format(e=e, v=v), "unasked fact")
        for t in DISTRACTORS:
            doc(t.format(e=e), "distractor")
    return held_out_questions(rng, docs, facts)


def kernel_options(p: argparse.ArgumentParser) -> None:
    """--native-kernels and --workdir, shared by the fact-tracing benchmarks (one cached model)."""
    p.add_argument(
        "--native-kernels",
        action="store_true",
        help="the CPU's own kernels, as `headwater demo --native-kernels`: faster, but the trained model and every figure then depend on the CPU",
    )
    p.add_argument(
        "--workdir", type=Path, help="cached model, indexes and queries (default /tmp/headwater-fact-tracing, -native with --native-kernels)"
    )


def portable_or_exit(args: argparse.Namespace) -> None:
    """Rerun this script in a child process with portable kernels (as the demos do) unless
    --native-kernels; then fill in the default workdir, one per kind of kernels."""
    if not args.native_kernels and (code := run_with_portable_kernels(sys.argv)) is not None:
        sys.exit(code)
    args.workdir = args.workdir or Path("/tmp/headwater-fact-tracing" + ("-native" if args.native_kernels else ""))


def asked_questions(args: argparse.Namespace, docs: list[dict], questions: list[dict]) -> tuple[list[dict], Path, list[list[int]]]:
    """The held-out questions the fact-tracing benchmarks ask (`args.queries` of them drawn with
    `args.seed`), the queries file they are written to in `args.workdir`, and each one's stating
    documents (indices into `docs`)."""
    questions = random.Random(args.seed).sample(questions, min(args.queries, len(questions)))
    qfile = args.workdir / "queries.jsonl"
    qfile.write_text("".join(json.dumps({k: q[k] for k in ("id", "prompt", "completion")}) + "\n" for q in questions))
    ids = {d["id"]: i for i, d in enumerate(docs)}
    return questions, qfile, [[ids[r] for r in q["relevant"]] for q in questions]


def value_first(docs: list[dict], questions: list[dict], relevant: list[list[int]]) -> list[list[bool]]:
    """Per question, whether each stating document names the value before the entity."""
    texts = [d["text"] for d in docs]
    return [[texts[i].index(q["completion"].strip()) < texts[i].index(q["entity"]) for i in rel] for q, rel in zip(questions, relevant)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entities", type=int, default=120)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--queries", type=int, default=160, help="held-out questions attributed (a random sample)")
    p.add_argument("--projection-dim", type=int, default=256)
    p.add_argument("--tail-patch-lr", type=float, default=1e-3, help="the tail-patch's SGD step (0: skip the tail-patch)")
    p.add_argument(
        "--tail-patch",
        nargs="*",
        default=["cosine, document rows", "dot product, document rows", "cosine, token rows (max)", "TrackStar, token rows (max)", "BM25", "random"],
        help="the methods whose top 10 are tail-patched",
    )
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fact_tracing.json")
    kernel_options(p)
    args = p.parse_args()
    portable_or_exit(args)
    torch.set_num_threads(2)
    cfg = HardConfig(seed=args.seed, entities=args.entities)
    t0 = time.time()
    model_dir, docs, questions = prepare(args.workdir, cfg, corpus=hard_corpus)
    train_s = time.time() - t0
    questions, qfile, relevant = asked_questions(args, docs, questions)
    correct = answered(model_dir, questions)
    rankings, seconds = {}, {}
    token_variants = [
        ("cosine, token rows (max)", lambda: Cosine()),
        ("TrackStar, token rows (max), no query mixing", lambda: TrackStar(config=TrackStarConfig(mix="0"))),
        ("TrackStar, token rows (max)", lambda: TrackStar()),
    ]
    for unit, normalised, variants in (
        ("document", False, [("cosine, document rows", lambda: Cosine()), ("dot product, document rows", lambda: Dot())]),
        ("token", False, token_variants),
        ("token", True, [(f"{name}, Adam-normalised", method) for name, method in token_variants]),
    ):
        t = time.time()
        config = BuildConfig(
            model=str(model_dir),
            data=str(args.workdir / "train.jsonl"),
            projection=ProjectionConfig(dim=args.projection_dim, seed=args.seed),
            batch_size=16,
            unit=unit,
            storage_dtype="float32",
            optimizer_state=str(model_dir / "optimizer.pt") if normalised else None,
        )
        index = build_index(args.workdir / f"index-{unit}{'-adamnorm' if normalised else ''}", config=config, resume=True)
        build_s = time.time() - t
        for name, method in variants:
            t = time.time()
            rankings[name] = _order(method().fit(index).score(str(qfile)))
            seconds[name] = build_s + time.time() - t
    t = time.time()
    rankings["BM25"] = _order(BM25().fit(docs).score(str(qfile)))
    seconds["BM25"] = time.time() - t
    rng = np.random.default_rng(args.seed)
    rankings["random"] = np.stack([rng.permutation(len(docs)) for _ in questions])
    seconds["random"] = 0.0
    results = {}
    groups = {"all": np.ones(len(questions), bool), "answered": correct, "not answered": ~correct}
    groups.update({f"relation {r}": np.array([q["relation"] == r for q in questions]) for r in RELATIONS})
    stated_value_first = value_first(docs, questions, relevant)
    for name, order in rankings.items():
        results[name] = {g: ranking_metrics(order[m], [rel for rel, keep in zip(relevant, m) if keep], k=10) for g, m in groups.items() if m.any()}
        for label, want in (("entity first", False), ("value first", True)):  # which comes first in the stating sentence
            hits = [d in row[:10].tolist() for row, rel, vf in zip(order, relevant, stated_value_first) for d, f in zip(rel, vf) if f == want]
            results[name][f"documents stating {label}"] = {"recall": float(np.mean(hits)), "documents": len(hits)}
    lines = [
        f"{len(docs)} documents, {len(questions)} held-out questions ({correct.mean():.0%} answered by the model; training {train_s:.0f} s)",
        "",
        "| method | Recall@10 | MRR | answered | not answered | entity stated first | value stated first | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    recall = lambda r, group: r.get(group, {}).get("recall", float("nan"))  # noqa: E731  (nan: no question in the group)
    for name, r in results.items():
        cells = [recall(r, g) for g in ("all", "answered", "not answered", "documents stating entity first", "documents stating value first")]
        lines.append(
            f"| {name} | {cells[0]:.3f} | {r['all']['mrr']:.3f} | " + " | ".join(f"{c:.3f}" for c in cells[1:]) + f" | {seconds[name]:.0f} |"
        )
    lines += ["", "Recall@10 by relation:", "", "| method | " + " | ".join(RELATIONS) + " |", "|---" * (1 + len(RELATIONS)) + "|"]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{recall(r, f'relation {rel}'):.3f}" for rel in RELATIONS) + " |")
    patched = tail_patch_table(model_dir, docs, questions, relevant, stated_value_first, rankings, args) if args.tail_patch_lr > 0 else {}
    if patched:
        lines += [
            "",
            f"Tail-patch: one SGD step (lr {args.tail_patch_lr:g}) on each document alone; the held-out answer's log-probability gain, 10⁻³ nats:",
            "",
            "| documents patched | mean gain | 95% interval | minus BM25's top 10 (paired) | share with gain > 0 | documents |",
            "|---|---|---|---|---|---|",
        ]
        milli = lambda m, lo, hi: f"{m * 1e3:+.2f} [{lo * 1e3:+.2f}, {hi * 1e3:+.2f}]"  # noqa: E731
        for name, r in patched.items():
            paired = milli(*r["minus_bm25"]) if "minus_bm25" in r else ""
            lines.append(
                f"| {name} | {r['mean'] * 1e3:.2f} | [{r['low'] * 1e3:.2f}, {r['high'] * 1e3:.2f}] | {paired} | {r['positive']:.2f} | {r['documents']} |"
            )
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "documents": len(docs),
                "answered": float(correct.mean()),
                "results": results,
                "tail_patch": patched,
                "seconds": seconds,
                "table": text,
            },
            indent=2,
        )
    )
    print(f"\nwrote {args.out}")


def tail_patch_table(model_dir, docs, questions, relevant, value_first, rankings, args) -> dict[str, dict]:
    """Tail-patch gains of each named method's top 10 per question, and of the documents stating
    each question's fact (entity first / value first): mean, its t-interval over questions (per
    question the mean of its documents), the share of documents with a positive gain."""
    from scipy import stats

    model, tokenizer = load_model(str(model_dir))
    task = LanguageModelTask(tokenizer)
    queries = [{"prompt": q["prompt"], "completion": q["completion"]} for q in questions]

    def interval(means: np.ndarray) -> tuple[float, float, float]:
        half = stats.t.ppf(0.975, len(means) - 1) * stats.sem(means)
        return float(means.mean()), float(means.mean() - half), float(means.mean() + half)

    def summary(per_question: list[np.ndarray], against: np.ndarray | None = None) -> dict:
        means = np.array([g.mean() for g in per_question if len(g)])
        mean, low, high = interval(means)
        out = {"mean": mean, "low": low, "high": high, "positive": float(np.mean(np.concatenate(per_question) > 0))}
        out["documents"] = int(sum(len(g) for g in per_question))
        if against is not None:  # paired over the same questions
            out["minus_bm25"] = interval(means - against)
        return out

    width = max(map(len, relevant))
    stating = np.array([rel + rel[:1] * (width - len(rel)) for rel in relevant])  # padded to a rectangle; padding dropped below
    # one call, so that a document several rankings pick is stepped once
    picks = np.concatenate([rankings[name][:, :10] for name in args.tail_patch] + [stating], axis=1)
    gains = tail_patch_gains(model, task, docs, queries, picks, lr=args.tail_patch_lr, progress=True)
    *parts, gains = np.split(gains, 10 * np.arange(1, len(args.tail_patch) + 1), axis=1)
    top = dict(zip(args.tail_patch, parts))
    bm25 = top["BM25"].mean(1) if "BM25" in top else None
    out = {f"{name}: top 10": summary(list(g), bm25) for name, g in top.items()}
    for label, want in (("entity first", False), ("value first", True)):
        out[f"documents stating the fact, {label}"] = summary([g[: len(vf)][np.array(vf) == want] for g, vf in zip(gains, value_first)])
    return out


if __name__ == "__main__":
    main()
