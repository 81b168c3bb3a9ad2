"""Top-k queries: the quick way to ask "which training records drove these queries?".

    top = headwater.query(index, queries, method="trackstar", top_k=20)        # a DataFrame

Scores stream from the method through an exact top-k (and bottom-k) per query, so memory is
bounded by k and the block size, never by the number of stored rows. A method that is already
fitted can be passed instead of a name.
"""

from __future__ import annotations

import pandas as pd

from .config import Config
from .data import record_text
from .errors import UserError
from .measurement import Measurement
from .methods import METHODS
from .methods.base import Method, query_records
from .ranking import rank, results_frame


def query(
    train,
    queries,
    method: str | Method = "cosine",
    top_k: int = 10,
    bottom_k: int = 0,
    pool: str | None = "max",
    measurement: Measurement | None = None,
    model=None,
    task=None,
    config: Config | None = None,
    max_chars: int = 200,
) -> pd.DataFrame:
    """Top (and bottom) training records per query: query_id, side, rank, train_id, record, unit,
    score, text.

    `train`: an Index, a list of checkpoint indexes (TracIn), or records. `pool` combines a
    record's rows (sentence/token units) into its score; `pool=None` ranks the rows themselves.
    """
    if isinstance(method, str):
        if method not in METHODS or method == "source":
            raise UserError(f"unknown method {method!r} for a query; choose one of {', '.join(m for m in METHODS if m != 'source')}")
        method = METHODS[method](model, task, config)
    if method.data is None:
        method.fit(train)
    data = method.fitted()
    _, query_ids = query_records(queries)
    blocks = method.score_blocks(queries, measurement or method.default_measurement())
    ranking = rank(blocks, top_k, bottom_k, pool, len(data))
    texts = lambda r, n: record_text(data.records[int(r)], n)
    return results_frame(ranking, query_ids, data.ids, texts, max_chars)
