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


# ------------------------------------------------------------------------- counterfactual checks
#
# Outcomes are query *losses* (the library's measurement). Scores are "positive = helps", i.e.
# a subset holding high-scoring examples should give a *low* loss, so LDS correlates the
# predicted sum of scores with the negated loss.


def subset_masks(n: int, m: int, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """[m, n] boolean masks, each selecting round(α·n) training examples uniformly at random."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    rng = np.random.default_rng(seed)
    size = max(1, round(alpha * n))
    masks = np.zeros((m, n), dtype=bool)
    for j in range(m):
        masks[j, rng.choice(n, size=size, replace=False)] = True
    return masks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); nan if either side is constant."""
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def lds(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> tuple[float, np.ndarray]:
    """Linear Datamodeling Score of `scores` [n, t] given subset `masks` [m, n] and the query
    `losses` [m, t] measured after training on each subset (averaged over seeds if several).

    Returns (mean over targets, per-target Spearman ρ between Σ_{i∈S_j} τ_i and −loss_j).
    """
    predicted = masks.astype(np.float64) @ np.asarray(scores, dtype=np.float64)
    per_target = np.array([spearman(predicted[:, k], -losses[:, k]) for k in range(losses.shape[1])])
    return float(np.nanmean(per_target)), per_target


def seed_ceiling(losses: np.ndarray) -> float:
    """How well retraining predicts itself: Spearman ρ between the mean losses of two disjoint
    halves of the seeds, [seeds, m, t] → mean over targets. An attribution's LDS against the
    all-seed mean is bounded by roughly this."""
    if losses.shape[0] < 2:
        raise ValueError("the seed ceiling needs outcomes from at least two seeds")
    half = losses.shape[0] // 2
    a, b = losses[:half].mean(0), losses[half:].mean(0)
    return float(np.nanmean([spearman(a[:, k], b[:, k]) for k in range(a.shape[1])]))


def retrain_losses(train_and_measure, masks: np.ndarray, seeds: list[int], processes: int = 1, progress: bool = True) -> np.ndarray:
    """Query losses [seeds, m, t] from `train_and_measure(mask [n] bool, seed) -> losses [t]`.

    With `processes > 1` the runs go to a process pool (the function must be picklable: a
    module-level function or a functools.partial of one).
    """
    from tqdm.auto import tqdm

    jobs = [(s, j) for s in seeds for j in range(len(masks))]
    if processes > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(processes) as pool:
            futures = [pool.submit(train_and_measure, masks[j], s) for s, j in jobs]
            results = [f.result() for f in tqdm(futures, desc="retraining", disable=not progress)]
    else:
        results = [train_and_measure(masks[j], s) for s, j in tqdm(jobs, desc="retraining", disable=not progress)]
    out = np.asarray(results, dtype=np.float64)
    return out.reshape(len(seeds), len(masks), -1)


def leave_k_out(scores: np.ndarray, k: int, train_and_measure, seeds: list[int], seed: int = 0) -> dict[str, float]:
    """Remove the k top-scored examples vs k random ones, retrain over seeds; mean change of the
    (mean) query loss relative to the full training set. A faithful attribution raises the loss
    more by removing its top proponents than random removal does."""
    n = len(scores)
    full = np.ones(n, dtype=bool)
    top = full.copy()
    top[np.argsort(-scores)[:k]] = False
    rand = full.copy()
    rand[np.random.default_rng(seed).choice(n, size=k, replace=False)] = False
    mean = lambda mask: float(np.mean([np.mean(train_and_measure(mask, s)) for s in seeds]))
    base = mean(full)
    return {"base_loss": base, "top_k_removed": mean(top) - base, "random_removed": mean(rand) - base}


def tail_patch(model, task, train_records, queries, scores: np.ndarray, k: int = 10, lr: float = 1e-3, seed: int = 0) -> dict[str, float]:
    """Tail-patch (TrackStar's check): one SGD step of size `lr` on each of the k top-scored training
    examples, alone, from the trained model; the mean increase of the query's target log-probability
    (−loss), against the same for k random examples. `scores` [n, q]. A retrieval method that finds
    real proponents raises the target far more than random examples do."""
    import torch
    from torch.func import functional_call

    from .data import as_records

    train, qrecords = as_records(train_records), as_records(queries)
    params = {n: p.detach() for n, p in model.named_parameters()}
    bound = lambda p: (lambda *a, **kw: functional_call(model, p, a, kw))
    encode = lambda r: task.collate(task.encode(r))
    rng = np.random.default_rng(seed)
    top, rand = [], []
    for j in range(len(qrecords)):
        qbatch = encode(qrecords[j])
        with torch.no_grad():
            base = -float(task.per_example_loss(bound(params), qbatch).sum())
        for picks, out in ((np.argsort(-scores[:, j])[:k], top), (rng.choice(len(train), size=k, replace=False), rand)):
            for i in picks:
                p = {n: t.clone().requires_grad_(True) for n, t in params.items()}
                loss = task.per_example_loss(bound(p), encode(train[int(i)])).sum()
                grads = torch.autograd.grad(loss, list(p.values()), allow_unused=True)
                stepped = {n: t - lr * g if g is not None else t for (n, t), g in zip(p.items(), grads)}
                with torch.no_grad():
                    out.append(-float(task.per_example_loss(bound(stepped), qbatch).sum()) - base)
    return {"top_k": float(np.mean(top)), "random": float(np.mean(rand))}


class RetrainLM:
    """Built-in `train_and_measure` for causal LMs: replay `run` from the model at `model` on the kept
    training records (with the given data-order seed) and return each target's loss.

    Picklable (paths and a recipe), so `retrain_losses(..., processes=N)` can use it.
    """

    def __init__(self, model: str, data: str, targets: str, run):
        self.model, self.data, self.targets, self.run = model, data, targets, run

    def __call__(self, mask: np.ndarray, seed: int) -> np.ndarray:
        import dataclasses

        import torch

        from .build import load_model
        from .data import load_records
        from .methods.magic import Trainer
        from .task import LanguageModelTask, encode_records

        model, tokenizer = load_model(self.model)
        task = LanguageModelTask(tokenizer)
        records = load_records(self.data)
        kept = [records[int(i)] for i in np.flatnonzero(mask)]
        trainer = Trainer(model, task, kept, dataclasses.replace(self.run, seed=seed))
        trainer.load(trainer.train())
        batch = task.collate(encode_records(task, load_records(self.targets)))
        with torch.no_grad():
            return task.per_example_loss(model.eval(), batch).double().numpy()
