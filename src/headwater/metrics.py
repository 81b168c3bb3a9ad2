"""Metrics of attributions, apart from the retraining that produces their ground truth.

- LDS (linear datamodeling score): does the sum of a subset's scores predict the measurement
  after training on that subset? `seed_ceiling` bounds what any method can reach;
  `query_interval` says how much it depends on the targets drawn.
- Retrieval: Recall@k and MRR of records known to be relevant (fact tracing).

Outcomes are measurement values (e.g. query losses) after retraining; a measurement's direction
(saved in the `Scores`) says which way is "more", so a loss's outcomes are negated.
"""

from __future__ import annotations

import numpy as np

from .errors import UserError
from .scores import Scores


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); nan if either side is constant."""
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def oriented(scores: Scores, outcomes: np.ndarray) -> np.ndarray:
    """Outcomes turned so that larger = more of the measurement (losses negated)."""
    return -np.asarray(outcomes) if scores.direction == "down" else np.asarray(outcomes)


def check_sizes(scores: Scores, masks: np.ndarray | None = None, outcomes: np.ndarray | None = None) -> None:
    """Refuse scores whose records or queries do not match the retraining data."""
    if masks is not None and masks.shape[1] != scores.n_train:
        raise UserError(f"the scores cover {scores.n_train} training records, the subsets {masks.shape[1]}: they describe different data")
    if outcomes is not None and outcomes.shape[-1] != scores.n_queries:
        raise UserError(f"the scores have {scores.n_queries} queries, the retraining measured {outcomes.shape[-1]} targets")


def lds(scores: Scores, masks: np.ndarray, outcomes: np.ndarray) -> tuple[float, np.ndarray]:
    """Linear Datamodeling Score of `scores` given subset `masks` [m, n] and the outcomes [m, q]
    measured after training on each subset (averaged over seeds if several).

    Returns (mean over queries, per-query Spearman ρ between Σ_{i∈S_j} τ_i and the outcome).
    """
    check_sizes(scores, masks, outcomes)
    predicted = masks.astype(np.float64) @ scores.total().values.astype(np.float64)
    target = oriented(scores, outcomes)
    per_query = np.array([spearman(predicted[:, k], target[:, k]) for k in range(target.shape[1])])
    return float(np.nanmean(per_query)), per_query


def query_interval(per_query: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean of `per_query` [q] over queries (NaNs ignored): how far an
    LDS could move with other targets of the same kind. Pass the difference of two methods'
    per-query values on the same targets for a paired interval of their difference. Retraining
    noise enters through each query's own value. t rather than a percentile bootstrap because
    LDS runs have 10–20 targets, where the bootstrap is too narrow. (nan, nan) with fewer than
    two defined values."""
    from scipy.stats import t

    values = np.asarray(per_query, dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size < 2:
        return float("nan"), float("nan")
    half = t.ppf((1 + confidence) / 2, values.size - 1) * values.std(ddof=1) / np.sqrt(values.size)
    return float(values.mean() - half), float(values.mean() + half)


def seed_ceiling(outcomes: np.ndarray) -> float:
    """How well retraining predicts itself: Spearman ρ between the mean outcomes of two disjoint
    halves of the seeds, [seeds, m, q] → mean over queries. An attribution's LDS against the
    all-seed mean is bounded by roughly this."""
    if outcomes.shape[0] < 2:
        raise UserError("the seed ceiling needs outcomes from at least two seeds")
    half = outcomes.shape[0] // 2
    a, b = outcomes[:half].mean(0), outcomes[half:].mean(0)
    return float(np.nanmean([spearman(a[:, k], b[:, k]) for k in range(a.shape[1])]))


def retrieval_metrics(scores: Scores, relevant: list[list], k: int = 10) -> dict[str, float]:
    """Recall@k and MRR of the records whose ids are in `relevant[j]` for query j.

    Recall@k is the fraction of a query's relevant records in its top k, averaged over queries;
    MRR the mean reciprocal rank of the first relevant record.
    """
    if len(relevant) != scores.n_queries:
        raise UserError(f"relevant records are given for {len(relevant)} queries, the scores have {scores.n_queries}")
    position = {t: i for i, t in enumerate(scores.train_ids)}
    order = np.argsort(-scores.total().values.T, axis=1, kind="stable")
    return ranking_metrics(order, [[position[r] for r in rel] for rel in relevant], k)


def ranking_metrics(order: np.ndarray, relevant: list[list[int]], k: int = 10) -> dict[str, float]:
    """Recall@k and MRR from ranked record positions `order` [q, n] (best first)."""
    recalls, rranks = [], []
    for row, rel in zip(order, relevant):
        rel = set(rel)
        recalls.append(len(rel.intersection(row[:k].tolist())) / len(rel))
        hit = next((r for r, d in enumerate(row.tolist()) if d in rel), None)
        rranks.append(0.0 if hit is None else 1.0 / (hit + 1))
    return {"recall": float(np.mean(recalls)), "mrr": float(np.mean(rranks)), "k": k}
