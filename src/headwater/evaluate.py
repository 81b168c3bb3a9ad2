"""Evaluation of attributions: fact-tracing retrieval metrics and the BM25 baseline.

(LDS, leave-k-out and tail-patch, which need retraining, build on the same task objects.)
"""

from __future__ import annotations

import numpy as np


def fact_tracing_metrics(order: np.ndarray, relevant: list[list[int]], k: int = 10) -> dict[str, float]:
    """Recall@k and MRR of ranked documents.

    `order` [q, n]: document indices per query, best first. `relevant[i]`: the documents that
    state query i's fact. Recall@k is the fraction of them in the top k, averaged over queries;
    MRR is the mean reciprocal rank of the first relevant document.
    """
    recalls, rranks = [], []
    for row, rel in zip(order, relevant):
        rel = set(rel)
        recalls.append(len(rel.intersection(row[:k].tolist())) / len(rel))
        hit = next((r for r, d in enumerate(row.tolist()) if d in rel), None)
        rranks.append(0.0 if hit is None else 1.0 / (hit + 1))
    return {"recall": float(np.mean(recalls)), "mrr": float(np.mean(rranks)), "k": k}


def bm25_scores(documents: list[str], queries: list[str]) -> np.ndarray:
    """BM25 (bm25s, Lucene variant, English stop words) scores [q, n] of every document."""
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(documents, stopwords="en", show_progress=False), show_progress=False)
    tokens = bm25s.tokenize(queries, stopwords="en", show_progress=False)
    docs, scores = retriever.retrieve(tokens, k=len(documents), show_progress=False)
    out = np.zeros((len(queries), len(documents)), dtype=np.float32)
    np.put_along_axis(out, docs, scores, axis=1)
    return out
