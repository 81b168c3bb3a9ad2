"""TracIn over checkpoints: score(z, q) = Σ_c η_c g_c(z)·g_c(q), one index per checkpoint.

Each checkpoint's index must hold the same records in the same row layout (build them with the
same data and settings); the indexes are streamed in lockstep, block by block.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pandas as pd
import torch

from ..data import load_records, record_ids
from ..errors import UserError
from ..query import rank


def tracin_blocks(indexes, query_grads: list[torch.Tensor], lrs: list[float], block_rows: int | None = None, verify: bool = True) -> Iterator[tuple[int, np.ndarray, torch.Tensor]]:
    """(first row, ids [b, 2], Σ_c η_c rows_c @ q_cᵀ [b, q]) over aligned indexes."""
    streams = [idx.store.blocks(block_rows, verify) for idx in indexes]
    for blocks in zip(*streams, strict=True):
        first = blocks[0]
        if any(b.start != first.start or not np.array_equal(b.ids, first.ids) for b in blocks[1:]):
            raise UserError("the checkpoint indexes do not hold the same rows in the same order; build them with the same data and settings")
        yield first.start, first.ids, sum(lr * (b.rows @ q.T) for lr, b, q in zip(lrs, blocks, query_grads))


def tracin(indexes, queries, lrs: list[float] | None = None, models=None, tasks=None, top_k: int = 10, bottom_k: int = 0, pool: str | None = "max", verify: bool = True) -> pd.DataFrame:
    """Top training records per query by TracIn over the checkpoints' indexes.

    `lrs[c]` is the learning rate in effect at checkpoint c (default 1 for each); `models`/`tasks`
    default to loading each index's own model.
    """
    lrs = list(lrs) if lrs else [1.0] * len(indexes)
    if len(lrs) != len(indexes):
        raise UserError(f"TracIn needs one learning rate per index: got {len(lrs)} for {len(indexes)} indexes")
    fps = {idx.manifest["data"]["fingerprint"] for idx in indexes}
    if len(fps) > 1:
        raise UserError("the checkpoint indexes were built from different training data")
    records = load_records(queries)
    models = models or [None] * len(indexes)
    tasks = tasks or [None] * len(indexes)
    grads = [idx.gradients(records, m, t) for idx, m, t in zip(indexes, models, tasks)]
    first = indexes[0]
    ranking = rank(tracin_blocks(indexes, grads, lrs, verify=verify), top_k, bottom_k, pool if first.pooled else None, first.n_records)
    return first.frame(ranking, record_ids(records))
