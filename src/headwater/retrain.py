"""Counterfactual ground truth by retraining, for checking what attributions claim.

- `subset_masks` + `retrain_outcomes`: train on random subsets (over seeds, across processes) and
  measure the queries, the ground truth of LDS (metrics.py).
- `leave_k_out`: remove a method's top proponents vs random records, retrain, compare.
- `tail_patch`: one optimizer step on each top proponent alone, from the trained model;
  `tail_patch_gains` does it for any ranking's picks.
- `RetrainLM`: the built-in `train_and_measure` for causal LMs (replays a `TrainConfig`).

`train_and_measure(mask [n] bool, seed) -> outcomes [q]` is the user's contract: train on the
records where `mask` is true with that seed, return the queries' measurement values.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .config import TrainConfig
from .data import as_records, load_records
from .errors import UserError
from .metrics import check_sizes, oriented
from .models import load_model
from .scores import Scores
from .task import LanguageModelTask, collated_batches, whole_examples
from .training import Replay


def subset_masks(n: int, m: int, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """[m, n] boolean masks, each selecting round(α·n) training records uniformly at random."""
    if not 0 < alpha < 1:
        raise UserError(f"alpha must be in (0, 1), got {alpha}")
    rng = np.random.default_rng(seed)
    size = max(1, round(alpha * n))
    masks = np.zeros((m, n), dtype=bool)
    for j in range(m):
        masks[j, rng.choice(n, size=size, replace=False)] = True
    return masks


def retrain_outcomes(train_and_measure, masks: np.ndarray, seeds: list[int], processes: int = 1, progress: bool = True) -> np.ndarray:
    """Outcomes [seeds, m, q] of `train_and_measure(mask, seed)` for every mask and seed.

    With `processes > 1` the runs go to a process pool (the function must be picklable: a
    module-level function, a functools.partial of one, or `RetrainLM`).
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
    return np.asarray(results, dtype=np.float64).reshape(len(seeds), len(masks), -1)


def leave_k_out(scores: Scores, k: int, train_and_measure, seeds: list[int], seed: int = 0) -> dict[str, float]:
    """Remove the k top-scored records (scores averaged over queries) vs k random ones, retrain over
    seeds; the mean outcome's change from the full training set, oriented so that a drop means
    less of the measurement. A faithful attribution's top proponents drop it more than random."""
    n = scores.n_train
    if not 0 < k < n:
        raise UserError(f"k must be between 1 and {n - 1}, got {k}")
    mean_scores = scores.total().values.mean(1)
    full = np.ones(n, dtype=bool)
    top, rand = full.copy(), full.copy()
    top[np.argsort(-mean_scores)[:k]] = False
    rand[np.random.default_rng(seed).choice(n, size=k, replace=False)] = False

    def mean(mask):
        outcomes = np.stack([np.asarray(train_and_measure(mask, s), dtype=np.float64) for s in seeds])
        check_sizes(scores, outcomes=outcomes)
        return float(oriented(scores, outcomes).mean())

    base = mean(full)
    return {"base": base, "top_k_removed": mean(top) - base, "random_removed": mean(rand) - base}


def tail_patch(model, task, train_records, queries, scores: Scores, k: int = 10, lr: float = 1e-3, seed: int = 0) -> dict[str, float]:
    """TrackStar's check: one SGD step of size `lr` on each of a query's k top-scored training
    records, alone, from the trained model; the mean increase of the query's target
    log-probability (−loss), against the same for k random records. To first order the gain is
    `lr` times the dot product of the record's and the target's whole gradients: the trained
    model's local sensitivity, which retraining need not agree with (docs/benchmarks.md)."""
    train, qrecords = as_records(train_records), as_records(queries)
    if scores.n_train != len(train) or scores.n_queries != len(qrecords):
        raise UserError(
            f"scores of {scores.n_train} records × {scores.n_queries} queries do not match {len(train)} records and {len(qrecords)} queries"
        )
    if not 0 < k <= len(train):
        raise UserError(f"k must be between 1 and {len(train)}, got {k}")
    top = np.argsort(-scores.total().values, axis=0)[:k].T
    rng = np.random.default_rng(seed)
    rand = np.stack([rng.choice(len(train), size=k, replace=False) for _ in qrecords])
    gains = tail_patch_gains(model, task, train, qrecords, np.concatenate([top, rand], axis=1), lr)
    return {"top_k": float(gains[:, :k].mean()), "random": float(gains[:, k:].mean())}


def tail_patch_gains(model, task, train_records, queries, picks: np.ndarray, lr: float = 1e-3, progress: bool = False) -> np.ndarray:
    """[q, k] increase of query j's target log-probability (−loss) after one SGD step of size `lr`
    on training record `picks[j, i]` alone, from the trained model: the tail-patch of any
    ranking (an attribution method's, a lexical retriever's, a random one) on the same footing."""
    from torch.func import functional_call
    from tqdm.auto import tqdm

    train, qrecords = as_records(train_records), as_records(queries)
    picks = np.asarray(picks)
    if picks.ndim != 2 or len(picks) != len(qrecords) or picks.size and not 0 <= picks.min() <= picks.max() < len(train):
        raise UserError(f"picks must be [{len(qrecords)} queries, k] indices into {len(train)} training records, got shape {picks.shape}")
    params = {n: p.detach() for n, p in model.named_parameters()}
    bound = lambda p: lambda *a, **kw: functional_call(model, p, a, kw)
    encode = lambda r: task.collate([task.whole(r)])
    qbatches = [encode(q) for q in qrecords]
    with torch.no_grad():
        base = np.array([-float(task.loss(bound(params), b).sum()) for b in qbatches])
    gains = np.zeros(picks.shape)
    # one step per picked record, shared by every query that picked it (hub documents are
    # picked by most queries)
    for i in tqdm(np.unique(picks), desc="tail-patch", disable=not progress):
        p = {n: t.clone().requires_grad_(True) for n, t in params.items()}
        loss = task.loss(bound(p), encode(train[int(i)])).sum()
        grads = torch.autograd.grad(loss, list(p.values()), allow_unused=True)
        stepped = {n: t - lr * g if g is not None else t for (n, t), g in zip(p.items(), grads)}
        with torch.no_grad():
            for j, c in zip(*np.nonzero(picks == i)):
                gains[j, c] = -float(task.loss(bound(stepped), qbatches[j]).sum()) - base[j]
    return gains


class RetrainLM:
    """Built-in `train_and_measure` for causal LMs: replay `run` from the model at `model` on the
    kept training records (with the given data-order seed); return each target's loss.

    Picklable (paths and a recipe), so `retrain_outcomes(..., processes=N)` can use it.
    """

    def __init__(self, model: str, data: str, targets: str, run: TrainConfig):
        self.model, self.data, self.targets, self.run = model, data, targets, run

    def __call__(self, mask: np.ndarray, seed: int) -> np.ndarray:
        model, tokenizer = load_model(self.model)
        task = LanguageModelTask(tokenizer)
        records = load_records(self.data)
        if len(mask) != len(records):
            raise UserError(f"the mask covers {len(mask)} records, {self.data} has {len(records)}")
        kept = [records[int(i)] for i in np.flatnonzero(mask)]
        replay = Replay(model, task, kept, dataclasses.replace(self.run, data_seed=seed))
        replay.load(replay.train())
        targets = load_records(self.targets)
        with torch.no_grad():
            return torch.cat([task.loss(model.eval(), b) for b in collated_batches(task, whole_examples(task, targets), 16)]).double().numpy()
