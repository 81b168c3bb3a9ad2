"""Streaming accumulation of bin statistics over scored training rows.

Scores arrive as blocks of rows (first row, ids [b, 2] = (record, unit), scores [b, Q]) from any
method's `score_blocks`. Rows of a record are pooled into the record's score (its rows are
contiguous in a store; a record cut by a block edge is kept aside as a partial and finished at
the end), then added into small per-bin sums. Memory is O(bins × Q + R × bins × B + top-k): no
[n, Q] matrix is ever held. Every sum is additive, so ranks that each read part of the store
combine by an all-reduce (`merge`).

Per view v (a label column, or several together), with K bins, Q query columns in B benchmarks
and R bootstrap replicates, the accumulator keeps:
- `count` [K] records per bin; `S` [K, Q] Σ scores;
- `GC` [G, K] records and `GX` [G, K, B] Σ benchmark score per group of records: each record
  falls in one of G groups by a hash of its index; `W` [R, K] and `WX` [R, K, B], the document
  bootstrap's weighted sums, come from them at the end with one Poisson(1) weight per group and
  replicate (a bootstrap over random groups of records: the cost per record does not grow with
  R, and every split of the store into blocks or ranks gives the same replicates; weights are
  shared by all benchmarks, so contrasts pair);
- per benchmark: Σx and Σx² over all records (the permutation null), the top-k records by
  benchmark score, and each bin's best few records (examples).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError
from .stats import poisson_weights, splitmix64

GROUPS = 1024  # random groups of records the document bootstrap resamples
CHUNK = 2048  # rows per update: bounds the [R, chunk] temporaries (a few MB, reused by the allocator)


class Partials:
    """Pooled scores of records cut by block edges: record -> (value [Q], rows)."""

    def __init__(self, pool: str):
        self.pool, self.items = pool, {}

    def add(self, record: int, value: np.ndarray, rows: int) -> None:
        if record in self.items:
            old, n = self.items[record]
            value = np.maximum(old, value) if self.pool == "max" else old + value
            rows += n
        self.items[record] = (value, rows)

    def finished(self) -> tuple[np.ndarray, np.ndarray]:
        """(records [m], values [m, Q]) with mean pooling divided out."""
        if not self.items:
            return np.zeros(0, np.int64), None
        recs = np.array(sorted(self.items), dtype=np.int64)
        vals = np.stack([self.items[r][0] / (self.items[r][1] if self.pool == "mean" else 1) for r in recs])
        return recs, vals


def pool_block(ids: np.ndarray, scores: np.ndarray, pool: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of one block pooled per record: (records [m], sums-or-maxima [m, Q], rows [m]), records
    in order of first appearance."""
    rec = ids[:, 0]
    if len(rec) and np.all(rec[1:] != rec[:-1]):  # one row per record: nothing to pool
        return rec, scores, np.ones(len(rec), np.int64)
    starts = np.flatnonzero(np.r_[True, rec[1:] != rec[:-1]])
    records = rec[starts]
    if len(np.unique(records)) != len(records):
        raise UserError("the rows of a record are not contiguous in the score stream; bins need each record's rows together")
    counts = np.diff(np.r_[starts, len(rec)])
    values = np.maximum.reduceat(scores, starts, axis=0) if pool == "max" else np.add.reduceat(scores, starts, axis=0)
    return records, values, counts


def empty_top(columns: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((0, columns), -np.inf), np.zeros((0, columns), np.int64)


def merge_top(top: tuple[np.ndarray, np.ndarray], more: tuple[np.ndarray, np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (values [k, C], records [k, C]) per column of two candidate sets, best first,
    ties broken by record index (so any split of the rows gives the same set)."""
    vals, recs = more
    if len(vals) > k:  # only rows at or above a column's k-th best new value can enter it (ties kept)
        kth = -np.partition(-vals, k - 1, axis=0)[k - 1]
        columns = [np.flatnonzero(vals[:, j] >= kth[j]) for j in range(vals.shape[1])]
        width = max(len(c) for c in columns)
        pick = np.stack([np.pad(c, (0, width - len(c)), constant_values=c[0]) for c in columns], 1)  # repeats lose the sort
        vals, recs = np.take_along_axis(vals, pick, 0), np.take_along_axis(recs, pick, 0)
    vals, recs = np.concatenate([top[0], vals]), np.concatenate([top[1], recs])
    if not vals.size:
        return vals[:0], recs[:0]
    keep = np.lexsort((recs, -vals), axis=0)
    vals, recs = np.take_along_axis(vals, keep, 0), np.take_along_axis(recs, keep, 0)
    first = np.ones(vals.shape, bool)  # drop padded repeats of a record within a column
    first[1:] = (recs[1:] != recs[:-1]) | (vals[1:] != vals[:-1])
    if first.all():
        return vals[:k], recs[:k]
    out_v, out_r = np.full((k, vals.shape[1]), -np.inf), np.zeros((k, vals.shape[1]), np.int64)
    for j in range(vals.shape[1]):
        v, r = vals[first[:, j], j][:k], recs[first[:, j], j][:k]
        out_v[: len(v), j], out_r[: len(r), j] = v, r
    return out_v[: min(k, len(vals))], out_r[: min(k, len(vals))]


class BinAccumulator:
    """Sums per bin for every view; see the module docstring."""

    def __init__(
        self,
        codes: dict[str, np.ndarray],
        n_bins: dict[str, int],
        columns: list[slice],
        n_records: int,
        pool: str = "max",
        replicates: int = 200,
        seed: int = 0,
        top_k: int = 100,
        examples: int = 3,
    ):
        """`codes[view]` [n_records] bin of every record; `columns[b]` the query columns of
        benchmark b; `pool` how a record's rows combine (max, mean, sum)."""
        self.codes, self.n_bins, self.columns, self.n = codes, n_bins, columns, n_records
        self.pool, self.R, self.seed, self.k, self.e = pool, replicates, seed, min(top_k, n_records), examples
        Q, B = columns[-1].stop, len(columns)
        self.count = {v: np.zeros(K) for v, K in n_bins.items()}
        self.S = {v: np.zeros((K, Q)) for v, K in n_bins.items()}
        self.G = min(GROUPS, max(n_records, 1))
        self.GC = {v: np.zeros((self.G, K)) for v, K in n_bins.items()}
        self.GX = {v: np.zeros((self.G, K, B)) for v, K in n_bins.items()}
        self.total, self.total_sq = np.zeros(B), np.zeros(B)
        self.top = empty_top(B)  # the best records by benchmark score (the map's top list)
        self.qtop = empty_top(Q)  # the best records of each benchmark item (enrichment)
        self.best = {v: (np.full((K, B, 0), -np.inf), np.zeros((K, B, 0), np.int64)) for v, K in n_bins.items()}
        self.seen = np.zeros(n_records, bool)
        self.x = np.zeros((n_records, B), np.float32)  # each record's benchmark scores (for unlearning, filtering)
        self.partials = Partials(pool)
        self.rows = 0

    # ------------------------------------------------------------------ input

    def add_block(self, ids: np.ndarray, scores: torch.Tensor | np.ndarray) -> None:
        """One scored block: ids [b, 2] (record, unit), scores [b, Q]; taken in slices of CHUNK
        rows so that the float64 temporaries stay small whatever the store's block size."""
        ids = np.asarray(ids, dtype=np.int64)
        self.rows += len(ids)
        for lo in range(0, len(ids), CHUNK):
            part = scores[lo : lo + CHUNK]
            part = part.double().numpy() if isinstance(part, torch.Tensor) else np.asarray(part, dtype=np.float64)
            self._add_slice(ids[lo : lo + CHUNK], part)

    def _add_slice(self, ids: np.ndarray, scores: np.ndarray) -> None:
        records, values, rows = pool_block(ids, scores, self.pool)
        if len(records) == 0:
            return
        # The first and last record may continue in a neighbouring slice: keep them aside.
        edge = np.zeros(len(records), bool)
        edge[[0, -1]] = True
        for i in np.flatnonzero(edge):
            self.partials.add(int(records[i]), values[i].copy(), int(rows[i]))  # a copy: a view would keep the whole slice alive
        done = ~edge
        if done.any():
            vals = values[done] / rows[done, None] if self.pool == "mean" else values[done]
            self.add_records(records[done], vals)

    def finish(self) -> None:
        """Add the records kept aside at block edges (after every block, and after a merge)."""
        records, values = self.partials.finished()
        self.partials = Partials(self.pool)
        if len(records):
            self.add_records(records, values)

    def add_records(self, records: np.ndarray, values: np.ndarray) -> None:
        """Complete records [m] with their pooled scores [m, Q]."""
        if records.max(initial=-1) >= self.n or records.min(initial=0) < 0:
            raise UserError(f"a scored row names record {int(records.max())}, but the labels cover {self.n} records")
        if self.seen[records].any():
            raise UserError(f"record {int(records[self.seen[records]][0])} was scored twice; bins need each record once")
        self.seen[records] = True
        x = np.stack([values[:, c].mean(1) for c in self.columns], 1)  # [m, B] each benchmark's score
        self.x[records] = x
        self.total += x.sum(0)
        self.total_sq += (x**2).sum(0)
        self.top = merge_top(self.top, (x, np.repeat(records[:, None], x.shape[1], 1)), self.k)
        self.qtop = merge_top(self.qtop, (values, np.repeat(records[:, None], values.shape[1], 1)), self.k)
        for lo in range(0, len(records), CHUNK):
            r, v, xs = records[lo : lo + CHUNK], values[lo : lo + CHUNK], x[lo : lo + CHUNK]
            g = (splitmix64(r.astype(np.uint64) ^ np.uint64(self.seed)) % np.uint64(self.G)).astype(np.int64)  # [m]
            for view, codes in self.codes.items():
                self._add_view(view, codes[r], g, r, v, xs)

    def _add_view(self, view: str, c: np.ndarray, g: np.ndarray, r: np.ndarray, v: np.ndarray, x: np.ndarray) -> None:
        """Bin codes c [m] and groups g [m] of records r [m], scores v [m, Q], benchmark scores x [m, B]."""
        K, Q, B = self.n_bins[view], v.shape[1], x.shape[1]
        # Flat bincounts instead of np.add.at or one-hot products: linear in m, no [m, K] temporary.
        self.count[view] += np.bincount(c, minlength=K)
        self.S[view] += np.bincount((c[:, None] * Q + np.arange(Q)).ravel(), weights=v.ravel(), minlength=K * Q).reshape(K, Q)
        gk = g * K + c
        self.GC[view] += np.bincount(gk, minlength=self.G * K).reshape(self.G, K)
        for b in range(B):
            self.GX[view][:, :, b] += np.bincount(gk, weights=x[:, b], minlength=self.G * K).reshape(self.G, K)
        self._best(view, c, r, x)

    def replicate_sums(self) -> tuple[dict, dict]:
        """(W [R, K], WX [R, K, B]) per view: the groups' sums under Poisson(1) weights [R, G]."""
        u = poisson_weights(np.arange(self.G), self.R, self.seed)
        return {v: u @ gc for v, gc in self.GC.items()}, {v: np.einsum("rg,gkb->rkb", u, gx) for v, gx in self.GX.items()}

    def _best(self, view: str, codes: np.ndarray, records: np.ndarray, x: np.ndarray) -> None:
        """Keep each bin's `e` highest-scoring records per benchmark (example documents)."""
        if self.e == 0:
            return
        vals, recs = self.best[view]
        K, B = vals.shape[:2]
        new_v = np.full((K, B, self.e), -np.inf)
        new_r = np.zeros((K, B, self.e), np.int64)
        for k in np.unique(codes):
            sel = codes == k
            for b in range(B):
                top = np.argsort(-x[sel, b], kind="stable")[: self.e]
                new_v[k, b, : len(top)], new_r[k, b, : len(top)] = x[sel, b][top], records[sel][top]
        allv, allr = np.concatenate([vals, new_v], 2), np.concatenate([recs, new_r], 2)
        keep = np.argsort(-allv, axis=2, kind="stable")[:, :, : self.e]
        self.best[view] = (np.take_along_axis(allv, keep, 2), np.take_along_axis(allr, keep, 2))

    # ------------------------------------------------------------------ ranks

    def merge(self, group=None) -> None:
        """Combine the accumulators of every rank of the default process group (then `finish`)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            self.finish()
            return
        if group is None and dist.get_backend() != "gloo":  # the sums live on the CPU; NCCL cannot reduce them
            group = dist.new_group(backend="gloo")
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, self.partials.items, group=group)
        self.partials = Partials(self.pool)
        if dist.get_rank() == 0:  # every rank has every partial; one adds them
            for items in parts:
                for rec, (value, rows) in items.items():
                    self.partials.add(rec, value, rows)
        self.finish()
        for name in ("count", "S", "GC", "GX"):
            for view, arr in getattr(self, name).items():
                t = torch.from_numpy(arr)
                dist.all_reduce(t, group=group)
                getattr(self, name)[view] = t.numpy()
        x = torch.from_numpy(self.x)
        dist.all_reduce(x, group=group)  # each record was scored on one rank, zeros elsewhere
        self.x = x.numpy()
        for name in ("total", "total_sq"):
            t = torch.from_numpy(getattr(self, name))
            dist.all_reduce(t, group=group)
            setattr(self, name, t.numpy())
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (self.top, self.qtop, self.best, self.rows), group=group)
        self.top, self.qtop = empty_top(len(self.columns)), empty_top(self.columns[-1].stop)
        for top, qtop, _, _ in gathered:
            self.top, self.qtop = merge_top(self.top, top, self.k), merge_top(self.qtop, qtop, self.k)
        for view in self.best:
            vals = np.concatenate([g[2][view][0] for g in gathered], 2)
            recs = np.concatenate([g[2][view][1] for g in gathered], 2)
            keep = np.argsort(-vals, axis=2, kind="stable")[:, :, : self.e]
            self.best[view] = (np.take_along_axis(vals, keep, 2), np.take_along_axis(recs, keep, 2))
        self.rows = sum(g[3] for g in gathered)

    def records_scored(self) -> int:
        return int(sum(self.count[next(iter(self.count))]))
