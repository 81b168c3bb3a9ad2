"""Which documents support the model's answers? Retraining says, in two checks.

**Value first.** On `benchmarks/fact_tracing.py`'s corpus, gradient methods miss the documents
that state a fact value first ("Tanka is the capital city of Oro .") and BM25 finds them. Among
the held-out facts stated by one value-first and two entity-first documents, the model is trained
twice more from the same initialisation and seed: once without each such fact's value-first
document, once without one of its entity-first documents instead (as many documents dropped each
time).

**Head to head.** For each of the benchmark's held-out questions, the best-ranked document in
TrackStar's top 10 (token rows) that BM25's top 10 lacks, and the other way round; the model is
trained once without all of TrackStar's such documents and once without all of BM25's. Whichever
method's own picks matter more to the answers it was asked about lowers them more.

Each check reports the change in the log probability of each question's answer against the full
model, with bootstrap intervals, beside the same changes for the questions left alone, and the
difference of the two: every retrained model drifts on all questions (by up to 2 nats on average,
differently in each training), and only the change beyond that drift is the dropped documents'.

    python benchmarks/fact_tracing_reversal.py      # 28 min on 2 cores (four trainings; cached after); after fact_tracing.py
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import fact_tracing
import numpy as np
import torch

from headwater import Index
from headwater.config import TrainConfig
from headwater.demos.facts import _order
from headwater.methods import BM25, TrackStar
from headwater.models import load_model
from headwater.task import LanguageModelTask
from headwater.toy import tiny_gpt2
from headwater.training import Replay


def dropped_documents(docs: list[dict], questions: list[dict]) -> tuple[set[int], set[int], list[int]]:
    """(value-first documents to drop, as many entity-first ones of the same facts, the facts' question indices)."""
    ids, texts = {d["id"]: i for i, d in enumerate(docs)}, [d["text"] for d in docs]
    value_first, entity_first, facts = set(), set(), []
    for j, q in enumerate(questions):
        relevant = [ids[r] for r in q["relevant"]]
        vf = [i for i in relevant if texts[i].index(q["completion"].strip()) < texts[i].index(q["entity"])]
        ef = [i for i in relevant if i not in vf]
        if len(vf) == 1 and len(ef) == 2:
            value_first.add(vf[0])
            entity_first.add(random.Random(j).choice(ef))
            facts.append(j)
    return value_first, entity_first, facts


def unique_picks(order: np.ndarray, other: np.ndarray, k: int = 10) -> list[int]:
    """Per query, the best-ranked record of `order`'s top k [q, n] that `other`'s top k lacks (−1: none)."""
    picks = []
    for mine, theirs in zip(order[:, :k], other[:, :k]):
        only = [int(i) for i in mine if i not in set(theirs.tolist())]
        picks.append(only[0] if only else -1)
    return picks


def head_to_head(args, docs: list[dict], questions: list[dict]) -> tuple[list[dict], dict[str, list[int]]]:
    """The benchmark's sampled questions and, per method, each one's unique pick against the other
    (TrackStar on the token index that fact_tracing.py built in the same workdir, BM25)."""
    sampled, qfile, _ = fact_tracing.asked_questions(args, docs, questions)
    index = args.workdir / "index-token"
    if not index.exists():
        raise SystemExit(f"no token index at {index}: run benchmarks/fact_tracing.py with the same --workdir first")
    trackstar = _order(TrackStar().fit(Index(index)).score(str(qfile)))
    bm25 = _order(BM25().fit(docs).score(str(qfile)))
    return sampled, {"TrackStar": unique_picks(trackstar, bm25), "BM25": unique_picks(bm25, trackstar)}


def trained_without(drop: set[int], docs, tokenizer, cfg, out: Path):
    """The model trained as the benchmark's, on every document but `drop` (cached in `out`)."""
    if (out / "config.json").exists():
        return load_model(str(out))[0]
    torch.manual_seed(cfg.seed)
    model = tiny_gpt2(len(tokenizer), cfg.n_layer, cfg.n_embd, cfg.n_head, n_positions=128)
    run = TrainConfig(
        optimizer="adamw", lr=cfg.lr, schedule=cfg.schedule, warmup=0.1, epochs=cfg.epochs, train_batch_size=cfg.train_batch, data_seed=cfg.seed
    )
    replay = Replay(model, LanguageModelTask(tokenizer), [d for i, d in enumerate(docs) if i not in drop], run)
    replay.load(replay.train(progress=True, desc=f"train without {len(drop)} documents")).eval()
    model.save_pretrained(out)
    return model


def answer_logprobs(model, tokenizer, questions: list[dict]) -> np.ndarray:
    """log p(answer | held-out question) per question [q]."""
    task = LanguageModelTask(tokenizer)
    with torch.no_grad():
        return np.array(
            [
                -float(task.loss(model.eval(), task.collate([task.whole({"prompt": q["prompt"], "completion": q["completion"]})])).sum())
                for q in questions
            ]
        )


def kinds_of(picks: list[int], docs: list[dict], questions: list[dict]) -> dict[str, int]:
    """How many picked documents state the question's own fact, name its entity, contain its answer, or neither."""
    out = {"state its fact": 0, "name its entity otherwise": 0, "contain its answer only": 0, "neither": 0}
    ids = {d["id"]: i for i, d in enumerate(docs)}
    for i, q in zip(picks, questions):
        if i < 0:
            continue
        text = docs[i]["text"]
        if i in {ids[r] for r in q["relevant"]}:
            out["state its fact"] += 1
        elif q["entity"] in text:
            out["name its entity otherwise"] += 1
        elif q["completion"].strip() in text:
            out["contain its answer only"] += 1
        else:
            out["neither"] += 1
    return out


def interval(x: np.ndarray, rng: np.random.Generator) -> dict:
    boot = [rng.choice(x, len(x)).mean() for _ in range(2000)]
    return {"mean": float(x.mean()), "lo": float(np.percentile(boot, 2.5)), "hi": float(np.percentile(boot, 97.5))}


def excess(changes: np.ndarray, touched: np.ndarray, alone: np.ndarray, rng: np.random.Generator) -> dict:
    """Mean change of the touched questions minus that of those left alone, with a bootstrap
    interval (each group resampled): a retrained model drifts on every question, by an amount that
    differs between trainings, so only the touched questions' change beyond that drift is the
    documents'."""
    a, b = changes[touched], changes[alone]
    boot = [rng.choice(a, len(a)).mean() - rng.choice(b, len(b)).mean() for _ in range(2000)]
    return {"mean": float(a.mean() - b.mean()), "lo": float(np.percentile(boot, 2.5)), "hi": float(np.percentile(boot, 97.5))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--queries", type=int, default=160, help="as fact_tracing.py's: the head-to-head's questions")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fact_tracing_reversal.json")
    fact_tracing.kernel_options(p)
    args = p.parse_args()
    fact_tracing.portable_or_exit(args)
    torch.set_num_threads(2)
    t0 = time.time()
    cfg = fact_tracing.HardConfig(seed=args.seed)
    model_dir, docs, questions = fact_tracing.prepare(args.workdir, cfg, corpus=fact_tracing.hard_corpus)
    full, tokenizer = load_model(str(model_dir))  # every arm shares the full corpus's vocabulary
    value_first, entity_first, facts = dropped_documents(docs, questions)
    arms = {
        "without the value-first document": trained_without(value_first, docs, tokenizer, cfg, args.workdir / f"reversal-{args.seed}-value-first"),
        "without an entity-first document": trained_without(entity_first, docs, tokenizer, cfg, args.workdir / f"reversal-{args.seed}-entity-first"),
    }
    rng = np.random.default_rng(args.seed)
    fmt = lambda r: f"{r['mean']:+.2f} [{r['lo']:+.2f}, {r['hi']:+.2f}]"  # noqa: E731

    def report(arms: dict, questions: list[dict], touched: np.ndarray, alone: np.ndarray, difference: str) -> tuple[dict, list[str]]:
        base = answer_logprobs(full, tokenizer, questions)
        changes = {name: answer_logprobs(m, tokenizer, questions) - base for name, m in arms.items()}
        first, second = changes.values()
        changes[difference] = first - second
        results = {
            name: {
                "questions changed": interval(c[touched], rng),
                "questions left alone": interval(c[alone], rng),
                "excess": excess(c, touched, alone, rng),
            }
            for name, c in changes.items()
        }
        lines = [
            "| arm | questions whose document was dropped | questions left alone (the retraining's drift) | the difference |",
            "|---|---|---|---|",
        ]
        return results, lines + [
            f"| {name} | {fmt(r['questions changed'])} | {fmt(r['questions left alone'])} | {fmt(r['excess'])} |" for name, r in results.items()
        ]

    touched = np.zeros(len(questions), bool)
    touched[facts] = True
    reversal, table = report(arms, questions, touched, ~touched, "value-first dropped − entity-first dropped")
    lines = [
        f"Value first: {len(facts)} of {len(questions)} held-out facts stated by one value-first and two entity-first documents; "
        f"change in log p(answer | held-out question) against the full model (95% bootstrap intervals over questions)",
        "",
        *table,
    ]
    sampled, picks = head_to_head(args, docs, questions)
    kinds = {name: kinds_of(chosen, docs, sampled) for name, chosen in picks.items()}
    arms = {
        f"without {name}'s unique picks": trained_without(
            {i for i in chosen if i >= 0}, docs, tokenizer, cfg, args.workdir / f"h2h-{args.seed}-{name}"
        )
        for name, chosen in picks.items()
    }
    position, ids = {q["id"]: j for j, q in enumerate(questions)}, {d["id"]: i for i, d in enumerate(docs)}
    touched = np.zeros(len(questions), bool)  # asked, with a unique pick from each method
    touched[[position[q["id"]] for q, a, b in zip(sampled, *picks.values()) if a >= 0 and b >= 0]] = True
    asked = np.isin(np.arange(len(questions)), [position[q["id"]] for q in sampled])
    dropped = set().union(*picks.values())
    alone = ~asked & np.array([not dropped & {ids[r] for r in q["relevant"]} for q in questions])  # not asked, no stating document dropped
    head, table = report(arms, questions, touched, alone, "TrackStar's dropped − BM25's dropped")
    sizes = ", ".join(f"{name}: {len(set(chosen) - {-1})}" for name, chosen in picks.items())
    lines += [
        "",
        f"Head to head: {int(touched.sum())} of the benchmark's {len(sampled)} questions have in each method's top 10 a document the other's lacks; "
        f"each arm drops the best-ranked such document per question ({sizes} documents); the {int(alone.sum())} questions left alone "
        "are the held-out questions the benchmark does not ask, less those with a stating document dropped in either arm",
        "",
        *table,
        "",
        "The dropped documents: " + "; ".join(f"{name}: " + ", ".join(f"{k} {v}" for k, v in c.items()) for name, c in kinds.items()),
    ]
    results = {"value first": reversal, "head to head": head, "head to head picks": kinds}
    text = "\n".join(lines)
    print(text)
    print(f"\ntotal {time.time() - t0:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, "facts": len(facts), "results": results, "table": text}, indent=2, ensure_ascii=False
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
