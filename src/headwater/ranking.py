"""From scored rows to results: pooling rows into records, streaming top-k, result tables.

Memory is bounded by the block size and k, not by the number of stored rows. When a record has
several rows (sentence or token units) its score is pooled over them (`max` by default: the
record's best span), which needs one running value per record and query.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .config import POOLS
from .errors import UserError


class Pooler:
    """Accumulates row scores into record scores: `add(records [b], scores [b, q])` per block,
    then `result()` → (values [n_records, q] float64, present [n_records] bool)."""

    def __init__(self, n_records: int, pool: str):
        if pool not in POOLS:
            raise UserError(f"unknown pooling {pool!r}; choose one of {', '.join(POOLS)}")
        self.n_records, self.pool = n_records, pool
        self.acc: torch.Tensor | None = None
        self.counts = torch.zeros(n_records, dtype=torch.float64)

    def add(self, records: np.ndarray, scores: torch.Tensor) -> None:
        rec = torch.as_tensor(np.asarray(records, dtype=np.int64))
        scores = scores.double()
        if self.acc is None:
            fill = -torch.inf if self.pool == "max" else 0.0
            self.acc = torch.full((self.n_records, scores.shape[1]), fill, dtype=torch.float64)
        index = rec[:, None].expand_as(scores)
        self.acc.scatter_reduce_(0, index, scores, reduce="amax" if self.pool == "max" else "sum")
        self.counts.index_add_(0, rec, torch.ones(len(rec), dtype=torch.float64))

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.acc is None:
            raise UserError("there are no rows to pool")
        present = self.counts > 0
        values = self.acc / self.counts.clamp_min(1)[:, None] if self.pool == "mean" else self.acc.clone()
        values[~present] = 0.0
        return values, present


UNIT_BITS = 32  # a row's item key is record << 32 | unit (records < 2^31, units < 2^32)


def row_keys(ids: np.ndarray) -> torch.Tensor:
    """One int64 key per row from its (record, unit) ids [b, 2]."""
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    return (ids[:, 0] << UNIT_BITS) | ids[:, 1]


@dataclass
class Ranking:
    """Best and worst items per query: `top_*`/`bottom_*` are [q, k] score and item arrays.

    Items are record indices when `pooled`, else row keys (`row_keys`: record and unit).
    """

    top_scores: np.ndarray
    top_items: np.ndarray
    bottom_scores: np.ndarray
    bottom_items: np.ndarray
    pooled: bool


def _merge(best_s, best_i, s: torch.Tensor, i: torch.Tensor, k: int, largest: bool):
    """Keep the k best of (previous best ∪ new block) per query; s [q, b], i [b]."""
    cand_s = s if best_s is None else torch.cat([best_s, s], 1)
    cand_i = i.expand(s.shape[0], -1) if best_i is None else torch.cat([best_i, i.expand(s.shape[0], -1)], 1)
    kk = min(k, cand_s.shape[1])
    vals, pos = torch.topk(cand_s, kk, dim=1, largest=largest, sorted=True)
    return vals, torch.gather(cand_i, 1, pos)


def rank(
    blocks: Iterator[tuple[int, np.ndarray, torch.Tensor]], top_k: int, bottom_k: int = 0, pool: str | None = None, n_records: int | None = None
) -> Ranking:
    """Stream (first row, ids [b, 2] = (record, unit), scores [b, q]) blocks; keep the top/bottom
    items per query. `pool=None` ranks rows; `pool` in max/mean/sum ranks the `n_records` records."""
    if top_k < 0 or bottom_k < 0 or top_k + bottom_k == 0:
        raise UserError("ask for top_k ≥ 1 or bottom_k ≥ 1")
    if pool is not None:
        if n_records is None:
            raise UserError("pooling needs the number of records")
        pooler = Pooler(n_records, pool)
        for _, ids, scores in blocks:
            pooler.add(ids[:, 0], scores)
        values, present = pooler.result()
        items = torch.nonzero(present).squeeze(1)
        return rank_dense(values[items].T, items, top_k, bottom_k, pooled=True)
    top = bottom = (None, None)
    for _, ids, scores in blocks:
        rows = row_keys(ids)
        st = scores.T  # [q, b]
        if top_k:
            top = _merge(*top, st, rows, top_k, True)
        if bottom_k:
            bottom = _merge(*bottom, st, rows, bottom_k, False)
    return _ranking(top, bottom, pooled=False)


def rank_dense(scores: torch.Tensor, items: torch.Tensor, top_k: int, bottom_k: int, pooled: bool) -> Ranking:
    """Top/bottom items of a dense [q, n] score matrix whose columns are `items` [n]."""
    top = _merge(None, None, scores, items, top_k, True) if top_k else (None, None)
    bottom = _merge(None, None, scores, items, bottom_k, False) if bottom_k else (None, None)
    return _ranking(top, bottom, pooled)


def _ranking(top, bottom, pooled: bool) -> Ranking:
    empty = (np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int64))
    ts, ti = (top[0].numpy(), top[1].numpy()) if top[0] is not None else empty
    bs, bi = (bottom[0].numpy(), bottom[1].numpy()) if bottom[0] is not None else empty
    return Ranking(ts, ti, bs, bi, pooled)


COLUMNS = ["query_id", "side", "rank", "train_id", "record", "unit", "score", "text"]


def results_frame(ranking: Ranking, query_ids: list, train_ids: list, texts: Callable[[int, int], str] | None, max_chars: int = 200) -> pd.DataFrame:
    """A tidy table: query_id, side, rank, train_id, record, unit (−1 for pooled records), score,
    text. `texts(record_index, max_chars) -> str` renders a record (empty text without it)."""
    out = []
    rendered: dict[int, str] = {}

    def text(record: int) -> str:  # a record recurs across queries: render it once
        if record not in rendered:
            rendered[record] = texts(record, max_chars) if texts is not None else ""
        return rendered[record]

    for side, scores, items in (("top", ranking.top_scores, ranking.top_items), ("bottom", ranking.bottom_scores, ranking.bottom_items)):
        for qi in range(scores.shape[0]):
            for r in range(scores.shape[1]):
                item = int(items[qi, r])
                record, unit = (item, -1) if ranking.pooled else (item >> UNIT_BITS, item & ((1 << UNIT_BITS) - 1))
                out.append(
                    {
                        "query_id": query_ids[qi],
                        "side": side,
                        "rank": r + 1,
                        "train_id": train_ids[record],
                        "record": record,
                        "unit": unit,
                        "score": float(scores[qi, r]),
                        "text": text(record),
                    }
                )
    return pd.DataFrame(out, columns=COLUMNS)


def write_results(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write a results table as .csv, .jsonl or .parquet (by suffix)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".parquet"):
        raise UserError(f"unsupported output type {suffix!r}; use .csv, .jsonl or .parquet")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
    else:
        frame.to_parquet(path, index=False)
    return path
