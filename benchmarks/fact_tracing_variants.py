"""Can a change in the method close token-row TrackStar's gap to BM25 on `fact_tracing.py`'s corpus?

Every variant scores the same token-unit index (built by `benchmarks/fact_tracing.py`, run it
first) for the same held-out questions, and reports Recall@10, MRR and the recall of the documents
that state the entity first (those retraining says matter, `fact_tracing_reversal.py`):

- pooling a record's token rows: max (the default), the mean of the top 2 or 3, the mean, max
  minus mean (a length correction), and each row's or record's score standardised over the
  questions (hubs that match every question lose their edge);
- TrackStar's query mixing: fixed weights and the automatic rule at other ranks;
- query-side token rows: every token of the question and answer as its own query row ("Q : Which
  animal stands for Boithlo ? A :" then " heron"), combined per record by the sum over query
  rows of their best-matching document row (late interaction), all rows alike or weighted by
  the model's surprisal of the token, and, as an oracle that knows which word is the entity, the
  answer row plus a share of the entity's row;
- a contrastive query: the answer row's scores minus their mean over the same question asked about
  four other entities (what is specific to this entity, not to predicting the answer word);
- one part of the model at a time (TrackStar's per-module scores summed over the attention
  modules, the MLPs, one layer, or the output head alone);
- the Kronecker-factored preconditioners (KFAC, EK-FAC: the inverse input covariance whitens the
  activations' common part) in place of TrackStar's R^(-1/2), on the same stored token rows, each
  row's score divided by its norm.

    python benchmarks/fact_tracing_variants.py     # ~5 min on 2 cores once fact_tracing.py has run (with the same --native-kernels or not)
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import Counter
from pathlib import Path

import fact_tracing
import numpy as np
import torch

from headwater.config import InfluenceConfig, TrackStarConfig
from headwater.demos.facts import prepare
from headwater.index import Index
from headwater.measurement import Loss
from headwater.methods import EKFAC, KFAC, TrackStar
from headwater.models import load_model
from headwater.store import GradientStore
from headwater.task import LanguageModelTask


def row_scores(method: TrackStar, queries: Path, by: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Row scores [rows, q] (with `by`: [k, rows, q]) and each row's record [rows]."""
    blocks = list(method.score_blocks(str(queries), Loss(), by))
    return torch.cat([b for _, _, b in blocks], dim=-2).double().numpy(), np.concatenate([i[:, 0] for _, i, _ in blocks])


def pooled(rows: np.ndarray, records: np.ndarray, n: int, how) -> np.ndarray:
    """Record scores [n, q]: `how` applied to each record's rows [r_i, q]."""
    order = np.argsort(records, kind="stable")
    rows, records = rows[order], records[order]
    edges = np.searchsorted(records, np.arange(n + 1))
    return np.stack([how(rows[a:b]) for a, b in zip(edges[:-1], edges[1:])])


def standardised(x: np.ndarray, axis: int) -> np.ndarray:
    return (x - x.mean(axis, keepdims=True)) / (x.std(axis, keepdims=True) + 1e-12)


def metrics(scores: np.ndarray, relevant: list[list[int]], entity_first: list[list[bool]]) -> dict:
    """Recall@10, MRR, and Recall@10 of the entity-first stating documents, from record scores [n, q]."""
    ranks = np.argsort(-scores, axis=0, kind="stable")
    recall, mrr, first = [], [], []
    for j, (rel, ef) in enumerate(zip(relevant, entity_first)):
        position = np.empty(len(ranks), dtype=np.int64)
        position[ranks[:, j]] = np.arange(len(ranks))
        recall.append(np.mean([position[d] < 10 for d in rel]))
        mrr.append(1 / (1 + min(position[d] for d in rel)))
        first += [position[d] < 10 for d, e in zip(rel, ef) if e]
    return {"recall": float(np.mean(recall)), "mrr": float(np.mean(mrr)), "entity_first": float(np.mean(first))}


def relation_of(text: str) -> str | None:
    """The asked relation whose statement template the document's text contains (None: none)."""
    for relation, (templates, _, _) in fact_tracing.RELATIONS.items():
        for t in templates:
            if re.search(re.escape(t).replace(re.escape("{e}"), r"\S+").replace(re.escape("{v}"), r"\S+"), text):
                return relation
    return None


def above_missed(scores: np.ndarray, relevant, entity_first, questions: list[dict], docs: list[dict]) -> dict:
    """What outranks the entity-first stating documents missed at 10: the first ten documents of
    each such question's ranking (record scores [n, q]), by kind, and how many share its answer."""
    ranks = np.argsort(-scores, axis=0, kind="stable")
    kinds, missed, shares = Counter(), 0, 0
    for j, (q, rel, ef) in enumerate(zip(questions, relevant, entity_first)):
        top = ranks[:10, j].tolist()
        n = sum(e and d not in top for d, e in zip(rel, ef))  # each missed document counts its question's top ten once
        if not n:
            continue
        missed += n
        for i in top:
            text, kind = docs[i]["text"], docs[i]["kind"]
            if i in rel:
                label = "its fact's other documents"
            elif q["entity"] in text:
                label = f"{kind} documents about its entity"
            elif kind == "fact":
                label = "same-relation facts of other entities" if relation_of(text) == q["relation"] else "other facts of other entities"
            else:
                label = f"{kind} documents of other entities"
            kinds[label] += n
            shares += n * (q["completion"].strip() in text)
    return {"missed": missed, "of": sum(map(sum, entity_first)), "above": dict(kinds.most_common()), "sharing the answer": shares}


def token_queries(questions: list[dict]) -> tuple[list[dict], np.ndarray, np.ndarray, np.ndarray]:
    """One query per word of each question + answer after the first: (queries, owner question [p],
    is the answer [p], is the entity [p])."""
    out, owner, answer, entity = [], [], [], []
    for j, q in enumerate(questions):
        words = (q["prompt"] + q["completion"]).split()
        for t in range(1, len(words)):
            out.append({"id": f"t{len(out)}", "prompt": " ".join(words[:t]), "completion": " " + words[t]})
            owner.append(j), answer.append(t == len(words) - 1), entity.append(words[t] == q["entity"])
    return out, np.array(owner), np.array(answer), np.array(entity)


def contrast_queries(questions: list[dict], entities: list[str], k: int, seed: int) -> list[dict]:
    """The questions, then each asked about `k` other entities with the same answer ([q·(1 + k)])."""
    rng = random.Random(seed)
    out = [{"id": f"q{j}", "prompt": q["prompt"], "completion": q["completion"]} for j, q in enumerate(questions)]
    for j, q in enumerate(questions):
        for i, e in enumerate(rng.sample([e for e in entities if e != q["entity"]], k)):
            out.append({"id": f"q{j}c{i}", "prompt": q["prompt"].replace(q["entity"], e), "completion": q["completion"]})
    return out


def surprisal(model_dir: Path, queries: list[dict]) -> np.ndarray:
    """The model's loss on each query's completion [p]: −log p(word | prompt), one token per word here."""
    model, tokenizer = load_model(str(model_dir))
    task = LanguageModelTask(tokenizer)
    model.eval()
    with torch.no_grad():
        return np.array([float(task.loss(model, task.collate([task.whole(q)])).sum()) for q in queries])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--queries", type=int, default=160)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fact_tracing_variants.json")
    fact_tracing.kernel_options(p)
    args = p.parse_args()
    fact_tracing.portable_or_exit(args)
    torch.set_num_threads(2)
    cfg = fact_tracing.HardConfig(seed=args.seed)
    model_dir, docs, questions = prepare(args.workdir, cfg, corpus=fact_tracing.hard_corpus)
    entities = sorted({q["entity"] for q in questions})
    questions, qfile, relevant = fact_tracing.asked_questions(args, docs, questions)
    texts, n = [d["text"] for d in docs], len(docs)
    entity_first = [[texts[i].index(q["entity"]) < texts[i].index(q["completion"].strip()) for i in rel] for q, rel in zip(questions, relevant)]
    index = Index(args.workdir / "index-token")
    results = {}

    rows, records = row_scores(TrackStar().fit(index), qfile)
    best = pooled(rows, records, n, lambda r: r.max(0))
    for name, scores in {
        "max (default)": best,
        "mean of the top 2": pooled(rows, records, n, lambda r: np.sort(r, 0)[-2:].mean(0)),
        "mean of the top 3": pooled(rows, records, n, lambda r: np.sort(r, 0)[-3:].mean(0)),
        "mean": pooled(rows, records, n, lambda r: r.mean(0)),
        "max − mean": pooled(rows, records, n, lambda r: r.max(0) - r.mean(0)),
        "rows standardised over questions, max": pooled(standardised(rows, 1), records, n, lambda r: r.max(0)),
        "records standardised over questions (max)": standardised(best, 1),
    }.items():
        results[f"pooling: {name}"] = metrics(scores, relevant, entity_first)
    misses = above_missed(best, relevant, entity_first, questions, docs)

    for mix in ("0", "0.5", "0.9", "0.99"):
        results[f"query mixing {mix}"] = metrics(
            TrackStar(config=TrackStarConfig(mix=mix)).fit(index).score(str(qfile)).values, relevant, entity_first
        )
    for rank in (30, 100):
        results[f"query mixing auto at rank {rank}"] = metrics(
            TrackStar(config=TrackStarConfig(mix_rank=rank)).fit(index).score(str(qfile)).values, relevant, entity_first
        )

    tokens, owner, answer, entity = token_queries(questions)
    tfile = args.workdir / "token_queries.jsonl"
    tfile.write_text("".join(json.dumps(t) + "\n" for t in tokens))
    rows, records = row_scores(TrackStar().fit(index), tfile)
    best = pooled(rows, records, n, lambda r: r.max(0))  # [n, token queries]
    weight = surprisal(model_dir, tokens)

    def per_question(w: np.ndarray) -> np.ndarray:
        out = np.zeros((n, len(questions)))
        np.add.at(out.T, owner, (best * w).T)
        return out

    for name, w in {
        "answer row alone": answer.astype(float),
        "all rows (late interaction)": np.ones(len(tokens)),
        "all rows weighted by surprisal": weight,
        "rows above ln 2 surprisal, weighted": np.maximum(weight - np.log(2), 0),
        "answer + 0.25 × entity row (oracle)": answer + 0.25 * entity,
        "answer + 0.5 × entity row (oracle)": answer + 0.5 * entity,
        "entity row alone (oracle)": entity.astype(float),
    }.items():
        results[f"query token rows: {name}"] = metrics(per_question(w), relevant, entity_first)

    method = TrackStar().fit(index)
    rows, records = row_scores(method, qfile, by="module")
    labels = method.labels("module")
    for part in ("attn", "mlp", "h.0.", "h.1.", "lm_head"):
        chosen = [i for i, name in enumerate(labels) if part in name]
        scores = pooled(rows[chosen].sum(0), records, n, lambda r: r.max(0))
        results[f"modules: {part.strip('.')} only"] = metrics(scores, relevant, entity_first)

    q, k = len(questions), 4
    cfile = args.workdir / "contrast_queries.jsonl"
    cfile.write_text("".join(json.dumps(c) + "\n" for c in contrast_queries(questions, entities, k, args.seed + 1)))
    for mix in ("auto", "0"):
        rows, records = row_scores(TrackStar(config=TrackStarConfig(mix=mix)).fit(index), cfile)
        others = rows[:, q:].reshape(len(rows), q, k).mean(2)
        for share in (0.5, 1.0):
            scores = pooled(rows[:, :q] - share * others, records, n, lambda r: r.max(0))
            results[f"contrast: answer row − {share:g} × other entities' (mixing {mix})"] = metrics(scores, relevant, entity_first)

    norms = torch.cat([b.rows.double().norm(dim=1) for b in GradientStore(args.workdir / "index-token").blocks()]).numpy()
    for method in (KFAC, EKFAC):
        fitted = method(config=InfluenceConfig(batch_size=16)).fit(index)  # EK-FAC reuses KFAC's factors
        for damping in (1.0, 10.0):
            fitted.config.damping = damping
            rows, records = row_scores(fitted, qfile)
            scores = pooled(rows / norms[:, None], records, n, lambda r: r.max(0))
            results[f"{method.__name__} instead of TrackStar, damping {damping:g}, rows normalised"] = metrics(scores, relevant, entity_first)

    lines = [
        f"{n} documents, {len(questions)} held-out questions, token-row TrackStar (BM25 on the same questions: see fact_tracing.py)",
        "",
        "| variant | Recall@10 | MRR | entity stated first |",
        "|---|---|---|---|",
    ]
    lines += [f"| {k} | {v['recall']:.3f} | {v['mrr']:.3f} | {v['entity_first']:.3f} |" for k, v in results.items()]
    lines += [
        "",
        f"The default misses {misses['missed']} of the {misses['of']} entity-first documents at 10. The first ten documents above each "
        f"({10 * misses['missed']}): "
        + ", ".join(f"{k} {v}" for k, v in misses["above"].items())
        + f"; {misses['sharing the answer']} of them contain its answer.",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = {"args": {k: str(v) for k, v in vars(args).items()}, "results": results, "misses": misses, "table": text}
    args.out.write_text(json.dumps(out, indent=2, ensure_ascii=False))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
