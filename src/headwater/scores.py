"""`Scores`: the one result type of every method and baseline.

Values are [n_train records, q queries] (float32, or float64 on request), with the training
records' and queries' ids, the method, the measurement and the resolved configuration that
produced them. An optional leading axis keeps a breakdown (per module, checkpoint or stage) that
`total()` sums away. Positive = the training record helps the measurement (measurement.py).

Saved as safetensors (the values) with JSON metadata (everything else): no pickles.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .data import record_text
from .errors import UserError
from .ranking import Pooler, rank_dense, results_frame

FORMAT = "headwater.scores/1"


@dataclass
class Scores:
    """Attribution scores of training records for queries.

    `values`: [n, q], or [k, n, q] with `axis` naming the leading dimension and `labels` its k
    entries. `train_ids` [n] and `query_ids` [q] identify records and queries; `measurement` is
    the measurement's description (with its direction), `config` the method's resolved settings,
    `diagnostics` what the method measured about its own reliability (MAGIC's smoothness check).
    """

    values: np.ndarray
    train_ids: list
    query_ids: list
    method: str = ""
    measurement: dict = field(default_factory=lambda: {"name": "loss", "direction": "down"})
    config: dict = field(default_factory=dict)
    axis: str | None = None
    labels: list | None = None
    diagnostics: dict = field(default_factory=dict)

    def __post_init__(self):
        self.values = np.asarray(self.values)
        if self.values.dtype not in (np.float32, np.float64):
            self.values = self.values.astype(np.float32)
        self.train_ids, self.query_ids = list(self.train_ids), list(self.query_ids)
        expected = 2 if self.axis is None else 3
        if self.values.ndim != expected:
            raise UserError(
                f"scores must have {expected} dimensions ({'axis, ' if self.axis else ''}records, queries), got shape {self.values.shape}"
            )
        n, q = self.values.shape[-2:]
        if n != len(self.train_ids) or q != len(self.query_ids):
            raise UserError(
                f"scores of shape {self.values.shape} do not match {len(self.train_ids)} training ids and {len(self.query_ids)} query ids"
            )
        if self.axis is not None and (self.labels is None or len(self.labels) != self.values.shape[0]):
            raise UserError(f"a breakdown along {self.axis!r} needs one label per entry ({self.values.shape[0]})")

    def __repr__(self) -> str:
        by = f", by {self.axis}" if self.axis else ""
        what = f"{self.method or 'unknown'}, {self.measurement.get('name', '?')}"
        return f"Scores({what}, {self.n_train} records × {self.n_queries} queries{by}, {self.values.dtype})"

    @property
    def n_train(self) -> int:
        return self.values.shape[-2]

    @property
    def n_queries(self) -> int:
        return self.values.shape[-1]

    @property
    def direction(self) -> str:
        return self.measurement.get("direction", "down")

    # ------------------------------------------------------------------ views

    def total(self) -> Scores:
        """The scores summed over the breakdown axis (itself when there is none)."""
        if self.axis is None:
            return self
        return replace(self, values=self.values.sum(0), axis=None, labels=None)

    def part(self, label) -> Scores:
        """One entry of the breakdown axis."""
        if self.axis is None or label not in self.labels:
            raise UserError(f"no {self.axis or 'breakdown'} entry {label!r}; have {self.labels}")
        return replace(self, values=self.values[self.labels.index(label)], axis=None, labels=None)

    def mean_query(self) -> Scores:
        """One column: the mean over queries (attributes a whole query set at once)."""
        return replace(self, values=self.values.mean(-1, keepdims=True), query_ids=["mean"])

    def astype(self, dtype) -> Scores:
        return replace(self, values=self.values.astype(dtype))

    def top_k(self, k: int = 10, bottom_k: int = 0, records=None, max_chars: int = 200) -> pd.DataFrame:
        """Top (and bottom) training records per query: query_id, side, rank, train_id, record,
        unit, score, text. `records` (the training records) fills the text column."""
        total = self.total()
        items = torch.arange(self.n_train)
        ranking = rank_dense(torch.from_numpy(total.values.T.copy()), items, k, bottom_k, pooled=True)
        texts = (lambda r, n: record_text(records[int(r)], n)) if records is not None else None
        return results_frame(ranking, self.query_ids, self.train_ids, texts, max_chars)

    # ------------------------------------------------------------------ construction from rows

    @classmethod
    def from_rows(cls, rows: np.ndarray | torch.Tensor, records: np.ndarray, n_records: int, pool: str = "max", **meta) -> Scores:
        """Record scores from row scores [r, q] (or [k, r, q]) and each row's record index [r].

        Several rows of a record (sentence/token units) are pooled; with one row per record this
        is a reordering. `meta` holds the other fields (train_ids, query_ids, method, ...).
        """
        rows = torch.as_tensor(np.asarray(rows))
        out_dtype = np.float64 if rows.dtype == torch.float64 else np.float32
        if rows.dim() == 2:
            pooler = Pooler(n_records, pool)
            pooler.add(records, rows)
            values = pooler.result()[0].numpy()
        else:
            values = np.stack([cls.from_rows(r, records, n_records, pool, **{**meta, "axis": None, "labels": None}).values for r in rows])
        return cls(values.astype(out_dtype), **meta)

    # ------------------------------------------------------------------ files

    def save(self, path: str | Path) -> Path:
        """Write `.safetensors` (values) with JSON metadata (ids, method, measurement, config, diagnostics)."""
        from safetensors.numpy import save_file

        path = Path(path)
        if path.suffix != ".safetensors":
            raise UserError(f"scores are saved as .safetensors, got {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT,
            "train_ids": self.train_ids,
            "query_ids": self.query_ids,
            "method": self.method,
            "measurement": self.measurement,
            "config": self.config,
            "axis": self.axis,
            "labels": self.labels,
            **({"diagnostics": self.diagnostics} if self.diagnostics else {}),  # files without stay readable by earlier versions
        }
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({"values": np.ascontiguousarray(self.values)}, str(tmp), metadata={"headwater": json.dumps(meta, default=str)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Scores:
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise UserError(f"scores file {path} does not exist")
        try:
            with safe_open(str(path), framework="numpy") as fh:
                meta = json.loads((fh.metadata() or {}).get("headwater", "{}"))
                values = fh.get_tensor("values")
        except Exception as exc:  # safetensors raises several types for a file that is not its own
            raise UserError(f"{path} is not a headwater scores file: {exc}") from None
        if meta.get("format") != FORMAT:
            raise UserError(f"{path} is not a headwater scores file (no {FORMAT} metadata)")
        meta.pop("format")
        return cls(values, **meta)
