"""The method protocol: `fit(train)` once, then `score(queries, measurement=...) -> Scores`.

`train` is always one of: records (a list of dicts, a `datasets.Dataset`, or a file / data-set
name), an `Index` (its stored rows serve as a feature cache where the method can use them, and it
supplies records, model and task), or, for methods over several checkpoints or models, a list of
indexes. Every method streams its scores as blocks of rows, (first row, ids [b, 2] = (record,
unit), scores [b, q]), which `score` pools into record-level `Scores` and `query.query` ranks
without a dense matrix.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..config import Config
from ..data import as_records, record_ids
from ..errors import UserError
from ..index import Index
from ..measurement import Loss, Measurement
from ..scores import Scores

Blocks = Iterator[tuple[int, np.ndarray, torch.Tensor]]


@dataclass
class TrainingData:
    """What `fit` was given: the records, their ids, and the index(es) when there are any."""

    records: object
    ids: list
    indexes: list[Index]

    @property
    def index(self) -> Index | None:
        return self.indexes[0] if self.indexes else None

    def __len__(self) -> int:
        return len(self.records)


def training_data(train) -> TrainingData:
    """Resolve `fit`'s argument (records, an Index, or a list of indexes over the same records)."""
    if isinstance(train, Index):
        return TrainingData(train.records, train.train_ids, [train])
    if isinstance(train, (list, tuple)) and train and all(isinstance(t, Index) for t in train):
        fps = {t.manifest["data"]["fingerprint"] for t in train}
        if len(fps) > 1:
            raise UserError("the indexes were built from different training data")
        return TrainingData(train[0].records, train[0].train_ids, list(train))
    records = as_records(train)
    ids = record_ids(records)
    return TrainingData(records, ids, [])


def query_records(queries):
    """(records, ids) of the queries."""
    records = as_records(queries)
    return records, record_ids(records)


class Method(ABC):
    """Base of every attribution method; subclasses implement `fit` and `score_blocks`."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[Config]]
    breakdowns: ClassVar[tuple[str, ...]] = ()  # what `score(by=...)` can keep apart
    config: Config
    data: TrainingData | None = None
    diagnostics: dict | None = None  # set by `score_blocks` where a method checks itself; kept in the Scores

    @abstractmethod
    def fit(self, train) -> Method:
        """Prepare everything that does not depend on the queries; returns self."""

    @abstractmethod
    def score_blocks(self, queries, measurement: Measurement, by: str | None = None) -> Blocks:
        """Stream (first row, ids [b, 2] = (record, unit), scores [b, q]) over the training rows;
        with `by`, scores [k, b, q]: one slice per module or checkpoint, summing to the total."""

    def labels(self, by: str) -> list:
        """The names along a breakdown axis (module names, checkpoints)."""
        raise UserError(f"{type(self).__name__} keeps no breakdown by {by!r}")

    def fitted(self) -> TrainingData:
        if self.data is None:
            raise UserError(f"{type(self).__name__}: call fit(train) before scoring")
        return self.data

    def default_measurement(self) -> Measurement:
        return Loss()

    def config_used(self) -> dict:
        """The settings saved with the scores: the config, with any default left open filled in."""
        return self.config.to_dict()

    def score(self, queries, measurement: Measurement | None = None, dtype=np.float32, by: str | None = None) -> Scores:
        """Scores [n_train records, q] of every training record for every query (`queries=None`
        for the probe methods, which score records against a concept directly: q = 1); with `by`
        ("module", "checkpoint": see `breakdowns`), [k, records, q] kept apart along that axis."""
        self.fitted()  # refuses an unfitted method before any work
        if by is not None and by not in self.breakdowns:
            raise UserError(f"{self.name} can keep apart {', '.join(self.breakdowns) or 'nothing'}, not {by!r}")
        measurement = measurement or self.default_measurement()
        qids = [measurement.name] if queries is None else query_records(queries)[1]  # a concept method's one column
        return self.scores_of_blocks(self.score_blocks(queries, measurement, by), qids, measurement, by, dtype)

    def scores_of_blocks(self, blocks: Blocks, qids: list, measurement: Measurement, by: str | None = None, dtype=np.float32) -> Scores:
        """The `Scores` of streamed (start, ids, rows) blocks, pooled to records."""
        data = self.fitted()
        blocks = list(blocks)
        rows = torch.cat([b for _, _, b in blocks], dim=-2) if blocks else torch.zeros(0, len(qids))
        row_records = np.concatenate([ids[:, 0] for _, ids, _ in blocks]) if blocks else np.zeros(0, np.int64)
        pool = getattr(self.config, "pool", "max")
        scores = Scores.from_rows(
            rows.double(),
            row_records,
            len(data),
            pool,
            train_ids=data.ids,
            query_ids=qids,
            method=self.name,
            measurement=measurement.describe(),
            config=self.config_used(),
            axis=by,
            labels=self.labels(by) if by else None,
            diagnostics=dict(self.diagnostics or {}),
        )
        return scores.astype(dtype)


def record_blocks(values: torch.Tensor) -> Blocks:
    """One block holding record-level scores [n, q] (for methods that score records directly)."""
    n = values.shape[0]
    yield 0, np.stack([np.arange(n), np.zeros(n, dtype=np.int64)], 1), values
