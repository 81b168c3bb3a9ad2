"""BM25, the lexical baseline every attribution method should beat: scores of each training
record's text for each query's text (bm25s, Lucene variant, English stop words).

It has no measurement: it ranks by words shared with the query, which makes it the reference for
what an attribution method adds beyond word overlap.
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import BM25Config
from ..data import record_text
from ..errors import UserError
from ..measurement import Loss, Measurement
from .base import Blocks, Method, query_records, record_blocks, training_data


def bm25_scores(documents: list[str], queries: list[str]) -> np.ndarray:
    """BM25 scores [n_documents, q] of every document for every query."""
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(documents, stopwords="en", show_progress=False), show_progress=False)
    tokens = bm25s.tokenize(queries, stopwords="en", show_progress=False)
    docs, scores = retriever.retrieve(tokens, k=len(documents), show_progress=False)
    out = np.zeros((len(queries), len(documents)), dtype=np.float32)
    np.put_along_axis(out, docs, scores, axis=1)
    return out.T


class BM25(Method):
    """BM25 over the records' texts (the same rendering as result tables)."""

    name = "bm25"
    config_class = BM25Config

    def __init__(self, model=None, task=None, config: BM25Config | None = None):
        """`model` and `task` are accepted (and ignored) so every method is built the same way."""
        self.config = config or BM25Config()

    def fit(self, train, progress: bool = False) -> BM25:
        self.data = training_data(train)
        self.documents = [record_text(self.data.records[i], None) for i in range(len(self.data))]
        return self

    def score_blocks(self, queries, measurement: Measurement, by: str | None = None) -> Blocks:
        self.fitted()
        if not isinstance(measurement, Loss):
            raise UserError("BM25 ranks by shared words; it takes no measurement")
        records, _ = query_records(queries)
        texts = [record_text(records[i], None) for i in range(len(records))]
        yield from record_blocks(torch.from_numpy(bm25_scores(self.documents, texts)))
