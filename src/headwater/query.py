"""Exact top-k / bottom-k over a whole index by streaming blocks of rows.

Memory is bounded by the block size and k, not by the number of stored rows. When an index has
several rows per record (span-level units), a record's score is pooled over its rows (`max` by
default: the record's best span), which needs one running value per record and query.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch

from .errors import UserError

POOLS = ("max", "mean", "sum")


@dataclass
class Ranking:
    """Best and worst items per query: `top_*`/`bottom_*` are [q, k] score and item-index arrays.

    Items are rows when `pooled` is False, else record indices.
    """

    top_scores: np.ndarray
    top_items: np.ndarray
    bottom_scores: np.ndarray
    bottom_items: np.ndarray
    pooled: bool


def _merge(best_s: torch.Tensor | None, best_i: torch.Tensor | None, s: torch.Tensor, i: torch.Tensor, k: int, largest: bool):
    """Keep the k best of (previous best ∪ new block) per query; s [q, b], i [b]."""
    cand_s = s if best_s is None else torch.cat([best_s, s], 1)
    cand_i = i.expand(s.shape[0], -1) if best_i is None else torch.cat([best_i, i.expand(s.shape[0], -1)], 1)
    kk = min(k, cand_s.shape[1])
    vals, pos = torch.topk(cand_s, kk, dim=1, largest=largest, sorted=True)
    return vals, torch.gather(cand_i, 1, pos)


def rank(blocks: Iterator[tuple[int, np.ndarray, torch.Tensor]], top_k: int, bottom_k: int = 0, pool: str | None = None, n_records: int | None = None) -> Ranking:
    """Stream (first row, ids [b, 2], scores [b, q]) blocks and keep the top/bottom items per query.

    `pool=None` ranks rows; `pool` in max/mean/sum ranks records (`n_records` of them).
    """
    if top_k < 0 or bottom_k < 0 or top_k + bottom_k == 0:
        raise UserError("ask for top_k ≥ 1 or bottom_k ≥ 1")
    if pool is not None:
        return _rank_pooled(blocks, top_k, bottom_k, pool, n_records)
    top = bottom = (None, None)
    for start, ids, scores in blocks:
        rows = torch.arange(start, start + len(ids))
        st = scores.T  # [q, b]
        if top_k:
            top = _merge(*top, st, rows, top_k, True)
        if bottom_k:
            bottom = _merge(*bottom, st, rows, bottom_k, False)
    return _ranking(top, bottom, pooled=False)


def _ranking(top, bottom, pooled: bool) -> Ranking:
    empty = (np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int64))
    ts, ti = (top[0].numpy(), top[1].numpy()) if top[0] is not None else empty
    bs, bi = (bottom[0].numpy(), bottom[1].numpy()) if bottom[0] is not None else empty
    return Ranking(ts, ti, bs, bi, pooled)


def _rank_pooled(blocks, top_k: int, bottom_k: int, pool: str, n_records: int | None) -> Ranking:
    if pool not in POOLS:
        raise UserError(f"unknown pooling {pool!r}; choose one of {', '.join(POOLS)}")
    if n_records is None:
        raise UserError("pooling needs the number of records")
    acc = counts = None
    for _, ids, scores in blocks:
        rec = torch.from_numpy(np.asarray(ids[:, 0]).copy())
        if acc is None:
            fill = -torch.inf if pool == "max" else 0.0
            acc = torch.full((n_records, scores.shape[1]), fill)
            counts = torch.zeros(n_records)
        index = rec[:, None].expand_as(scores)
        acc.scatter_reduce_(0, index, scores.float(), reduce="amax" if pool == "max" else "sum")
        counts.index_add_(0, rec, torch.ones(len(rec)))
    if acc is None:
        raise UserError("the index has no rows")
    if pool == "mean":
        acc = acc / counts.clamp_min(1)[:, None]
    present = torch.nonzero(counts > 0).squeeze(1)
    scores = acc[present].T
    top = _merge(None, None, scores, present, top_k, True) if top_k else (None, None)
    bottom = _merge(None, None, scores, present, bottom_k, False) if bottom_k else (None, None)
    return _ranking(top, bottom, pooled=True)


def results_frame(ranking: Ranking, query_ids: list, row_ids: np.ndarray, train_ids: list, texts, max_chars: int = 200) -> pd.DataFrame:
    """A tidy table: query_id, side, rank, train_id, record, unit, score, text.

    `row_ids` [rows, 2] maps row → (record, unit); `texts(record_index) -> str` renders a record.
    """
    out = []
    rendered: dict[int, str] = {}

    def text(record: int) -> str:  # a record recurs across queries: render it once
        if record not in rendered:
            rendered[record] = texts(record, max_chars)
        return rendered[record]

    for side, scores, items in (("top", ranking.top_scores, ranking.top_items), ("bottom", ranking.bottom_scores, ranking.bottom_items)):
        for qi in range(scores.shape[0]):
            for r in range(scores.shape[1]):
                item = int(items[qi, r])
                record, unit = (item, -1) if ranking.pooled else (int(row_ids[item, 0]), int(row_ids[item, 1]))
                out.append({
                    "query_id": query_ids[qi], "side": side, "rank": r + 1, "train_id": train_ids[record],
                    "record": record, "unit": unit, "score": float(scores[qi, r]), "text": text(record),
                })
    return pd.DataFrame(out, columns=["query_id", "side", "rank", "train_id", "record", "unit", "score", "text"])


def write_results(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write a results table as .csv, .jsonl or .parquet (by suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
    elif suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        raise UserError(f"unsupported output type {suffix!r}; use .csv, .jsonl or .parquet")
    return path
