"""Gradient similarity: dot product, cosine, TrackStar.

Training rows are gradients of the training loss (from an index, or computed in memory); query
rows are gradients of the measurement's objective in the same space. A positive score means a
gradient step on the training example moves the measurement in its declared direction.

    scores = Cosine(model, task).fit(train_records).score(queries)
    scores = TrackStar().fit(index).score(queries)
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..collect import GradientCollector, memory_store
from ..config import GradientConfig, TrackStarConfig
from ..errors import UserError
from ..measurement import Measurement, objective_fn
from ..precondition import BlockPreconditioner, autocorrelation, trackstar_preconditioner
from ..task import Task, at_least_float32, collated_batches, whole_examples
from .base import Blocks, Method, query_records, training_data

EPS = 1e-12


class Dot(Method):
    """Dot product of training-loss gradients with the measurement's objective gradients."""

    name = "dot"
    normalize = False
    config_class = GradientConfig
    breakdowns = ("module",)

    def __init__(self, model: torch.nn.Module | None = None, task: Task | None = None, config: GradientConfig | None = None):
        self.model, self.task = model, task
        self.config = config or self.config_class()

    def fit(self, train, progress: bool = False) -> Dot:
        self.data = training_data(train)
        index = self.data.index
        if index is not None:  # the index computes query rows with its own model unless one is given
            self.store = index.store
        else:
            if self.model is None or self.task is None:
                raise UserError(f"{type(self).__name__} without an index needs model= and task=")
            self.collector = GradientCollector(self.model, self.task, self.config.projection, self.config.modules)
            self.store = memory_store(self.collector, self.task, self.data.records, self.config.batch_size, progress)
        self.fit_rows()
        return self

    def fit_rows(self) -> None:
        """Fit what depends on the training rows alone (TrackStar's autocorrelation)."""

    def query_rows(self, queries, measurement: Measurement) -> torch.Tensor:
        """Objective gradients of the queries in the training rows' space, [q, dim]."""
        index = self.fitted().index
        if index is not None:
            return index.query_rows(queries, measurement, self.model, self.task, self.config.batch_size)
        records, _ = query_records(queries)
        fn = objective_fn(measurement, self.task)
        examples = whole_examples(self.task, records)
        return torch.cat([self.collector(b, fn) for b in collated_batches(self.task, examples, self.config.batch_size)])

    def fit_queries(self, rows: torch.Tensor) -> None:
        """Fit what depends on the query rows (TrackStar's mixed autocorrelation)."""

    def transform(self, rows: torch.Tensor) -> torch.Tensor:
        """Map training or query rows [n, dim] into the space where scores are dot products."""
        return F.normalize(rows, dim=1, eps=EPS) if self.normalize else rows

    def labels(self, by: str) -> list:
        return [name for name, _, _ in self.store.segments]

    def score_blocks(self, queries, measurement: Measurement, by: str | None = None) -> Blocks:
        return self.score_rows(self.query_rows(queries, measurement), by)

    def score_rows(self, q_rows: torch.Tensor, by: str | None = None, fit_on: int | None = None) -> Blocks:
        """Stream the training rows' scores against query rows [q, dim] already in their space
        (`by="module"`: one slice per tracked module, [k, b, q], summing to the scores).
        `fit_on`: fit the query side (TrackStar's mixing) on the first rows only, so derived rows
        appended after them (a gradient-space contrast) do not change the others' scores."""
        self.fitted()
        q_rows = at_least_float32(q_rows)  # a float64 model's queries are scored in float64
        if q_rows.shape[1] != self.store.dim:
            raise UserError(f"query gradients have {q_rows.shape[1]} dims, the training rows {self.store.dim}")
        self.fit_queries(q_rows if fit_on is None else q_rows[:fit_on])
        q = self.transform(q_rows)
        for block in self.store.blocks(reuse=True):
            rows = block.rows.to(q.dtype)
            if by is None:
                yield block.start, block.ids, self.block_scores(rows, q)
            else:
                t = self.transform(rows)
                yield block.start, block.ids, torch.stack([t[:, a:b] @ q[:, a:b].T for _, a, b in self.store.segments])

    def block_scores(self, rows: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return self.transform(rows) @ q.T


class Cosine(Dot):
    """Cosine similarity of gradients (unit-normalised dot product)."""

    name = "cosine"
    normalize = True

    def block_scores(self, rows: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        # Divide the dot products by the row norms rather than normalising a copy of the block.
        return (rows @ q.T) / rows.norm(dim=1, keepdim=True).clamp_min(EPS)


class TrackStar(Dot):
    """TrackStar: cosine after the damped R^{-1/2} preconditioner on both sides.

    R mixes a training sample's autocorrelation (`fit_rows` rows) with the queries'
    (`mix="auto"`: eigenvalue matching at `mix_rank`; `mix=0`: training rows alone, so the row
    transform is fixed once per index). The training autocorrelation is saved beside an index
    and reused by later queries. Blocks are the tracked modules.
    """

    name = "trackstar"
    normalize = True
    config_class = TrackStarConfig

    def fit_rows(self) -> None:
        cfg = self.config
        self.blocks = [(a, b) for _, a, b in self.store.segments]
        index = self.fitted().index
        cache = index.path / f"trackstar-r-{cfg.fit_rows}-{cfg.sample_seed}.safetensors" if index is not None else None
        if cache is not None and cache.exists():
            self.r_train = _load_blocks(cache)
        else:
            self.r_train = autocorrelation(self.store.sample(cfg.fit_rows, seed=cfg.sample_seed), self.blocks)
            if cache is not None:
                _save_blocks(cache, self.r_train)
        self.preconditioner: BlockPreconditioner | None = None
        if cfg.mix_weight() == 0:
            self.preconditioner = trackstar_preconditioner(self.r_train, None, self.blocks, 0.0, cfg.damping, cfg.mix_rank)

    def fit_queries(self, rows: torch.Tensor) -> None:
        cfg = self.config
        if cfg.mix_weight() != 0:
            r_eval = autocorrelation(rows, self.blocks)
            self.preconditioner = trackstar_preconditioner(self.r_train, r_eval, self.blocks, cfg.mix_weight(), cfg.damping, cfg.mix_rank)

    def transform(self, rows: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.preconditioner.apply(rows), dim=1, eps=EPS)


def _save_blocks(path: Path, blocks: list[torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({f"block{i}": b.contiguous() for i, b in enumerate(blocks)}, str(tmp))
    tmp.replace(path)


def _load_blocks(path: Path) -> list[torch.Tensor]:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    return [tensors[f"block{i}"] for i in range(len(tensors))]
