"""TracIn over checkpoints (arXiv 2002.08895): score(z, q) = Σ_c η_c g_c(z)·g_c(q).

A weighted sum of gradient dot products, one per checkpoint: fitted on one index per checkpoint
(built with the same data and settings, streamed in lockstep) or on records in memory.

    TracIn([ckpt1, ckpt2], task, TracInConfig(checkpoint_lr=[1e-3, 5e-4])).fit(records).score(queries)
    TracIn(config=TracInConfig(checkpoint_lr=[1e-3, 5e-4])).fit([index1, index2]).score(queries)
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import TracInConfig
from ..errors import UserError
from ..measurement import Measurement
from ..task import Task
from .base import Blocks, Method, training_data
from .gradient import Dot


class TracIn(Method):
    """Σ over checkpoints of the learning-rate-weighted gradient dot product."""

    name = "tracin"
    config_class = TracInConfig
    breakdowns = ("checkpoint", "module")

    def __init__(self, checkpoints: list[torch.nn.Module] | None = None, task: Task | None = None, config: TracInConfig | None = None):
        self.checkpoints, self.task = checkpoints, task
        self.config = config or TracInConfig()

    def fit(self, train, progress: bool = False) -> TracIn:
        self.data = training_data(train)
        if self.data.indexes:
            models = self.checkpoints or [None] * len(self.data.indexes)
            if len(models) != len(self.data.indexes):
                raise UserError(f"TracIn got {len(models)} models for {len(self.data.indexes)} checkpoint indexes")
            parts = [(m, idx) for m, idx in zip(models, self.data.indexes)]
        else:
            if not self.checkpoints or self.task is None:
                raise UserError("TracIn without indexes needs the checkpoints (models) and task=")
            parts = [(m, self.data.records) for m in self.checkpoints]
        lrs = self.config.checkpoint_lr or [1.0] * len(parts)
        if len(lrs) != len(parts):
            raise UserError(f"TracIn needs one learning rate per checkpoint: got {len(lrs)} for {len(parts)} checkpoints")
        self.lrs = lrs
        gradient = dict(self.config.to_dict())
        gradient.pop("checkpoint_lr")
        self.dots = [Dot(m, self.task, Dot.config_class.from_dict(gradient)).fit(t, progress) for m, t in parts]
        return self

    def labels(self, by: str) -> list:
        if by == "module":
            return self.dots[0].labels(by)
        return [str(idx.path) for idx in self.data.indexes] if self.data.indexes else [f"checkpoint {c}" for c in range(len(self.dots))]

    def score_blocks(self, queries, measurement: Measurement, by: str | None = None) -> Blocks:
        self.fitted()
        streams = [dot.score_blocks(queries, measurement, "module" if by == "module" else None) for dot in self.dots]
        for blocks in zip(*streams, strict=True):
            start, ids, _ = blocks[0]
            if any(b[0] != start or not np.array_equal(b[1], ids) for b in blocks[1:]):
                raise UserError("the checkpoint indexes do not hold the same rows in the same order; build them with the same data and settings")
            parts = [lr * b[2] for lr, b in zip(self.lrs, blocks)]
            yield start, ids, torch.stack(parts) if by == "checkpoint" else sum(parts)
