"""SOURCE (arXiv 2405.12186): influence along a training trajectory split into segments.

The run's checkpoints are grouped into segments ℓ = 1…L, each with learning rate η_ℓ and K_ℓ
steps. Within a segment the Hessian H̄_ℓ (EK-FAC pooled over its checkpoints) and each training
example's gradient ḡ_ℓ(z) (mean over its checkpoints) are treated as constant. Walking the
query backwards from the end of training,

    q_L = ∇L(query; θ_T),   r_ℓ = F(H̄_ℓ) q_ℓ,   q_{ℓ-1} = exp(−η_ℓ K_ℓ H̄_ℓ) q_ℓ,
    τ(z) = Σ_ℓ r_ℓ · ḡ_ℓ(z),       F(σ) = (1 − e^{−ηKσ}) / σ   (→ ηK as σ → 0).

τ(z) is positive when training on z lowers the query loss (helps). With heavy-ball momentum β
the effective step is η K / (1 − β). Two limits pin the construction: ηK → 0 gives TracIn at
one checkpoint (τ = ηK ∇L(q)·∇L(z)); ηK → ∞ gives the influence function ∇L(q)ᵀH⁻¹∇L(z).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..collect import GradientCollector
from ..config import ProjectionConfig, SourceConfig
from ..curvature import fit_curvature
from ..errors import UserError
from ..measurement import Measurement
from ..stages.trajectory import Trajectory
from ..task import Task
from .base import Blocks, Method, query_records, training_data
from .influence import record_gradients, stream_scores


@dataclass
class Segment:
    """Checkpoints of one stretch of training, its learning rate, its number of steps and, when
    known, its heavy-ball momentum (default: SourceConfig.momentum)."""

    checkpoints: list[torch.nn.Module]
    lr: float
    steps: int
    momentum: float | None = None

    def __post_init__(self):
        if not self.checkpoints:
            raise UserError("a SOURCE segment needs at least one checkpoint")
        if self.lr <= 0 or self.steps <= 0:
            raise UserError(f"a SOURCE segment needs a positive learning rate and step count, got lr={self.lr}, steps={self.steps}")


def segments_from_trainer_state(path: str | Path, checkpoints: dict[int, torch.nn.Module]) -> list[Segment]:
    """Segments from a Hugging Face `trainer_state.json` and checkpoints keyed by global step.

    Segment ℓ runs from the previous checkpoint's step (0 for the first) to checkpoint ℓ's step;
    its learning rate is the mean of the rates logged in that stretch and its checkpoint is the
    one at its end.
    """
    state = json.loads(Path(path).read_text())
    logged = [(e["step"], e["learning_rate"]) for e in state.get("log_history", []) if "learning_rate" in e]
    if not logged:
        raise UserError(f"{path} logs no learning rates (log_history has no 'learning_rate')")
    segments, prev = [], 0
    for step in sorted(checkpoints):
        rates = [lr for s, lr in logged if prev < s <= step] or [min(logged, key=lambda e: abs(e[0] - step))[1]]
        segments.append(Segment([checkpoints[step]], float(np.mean(rates)), step - prev))
        prev = step
    return segments


def _f(eta_k: float):
    """F(σ) = (1 − e^{−ηKσ})/σ, with the σ → 0 limit ηK."""

    def fn(sigma: torch.Tensor) -> torch.Tensor:
        safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
        return torch.where(sigma > 0, -torch.expm1(-eta_k * safe) / safe, torch.full_like(sigma, eta_k))

    return fn


class SOURCE(Method):
    """SOURCE scores over the segments of a training run (in training order).

        segments = [Segment([ckpt1], lr=1e-3, steps=300), Segment([ckpt2], lr=5e-4, steps=300)]
        scores = SOURCE(segments, task).fit(train_records).score(queries)

    The final model (where queries are measured) defaults to the last segment's last checkpoint.
    `fit` fits each segment's EK-FAC (pooled over its checkpoints) on the training records; with
    an index, its records and task are used.
    """

    name = "source"
    config_class = SourceConfig

    def __init__(
        self,
        segments: list[Segment] | None = None,
        task: Task | None = None,
        config: SourceConfig | None = None,
        final_model: torch.nn.Module | None = None,
    ):
        self.segments, self.task = segments, task
        self.config = config or SourceConfig()
        self.final_model = final_model

    def fit(self, train, progress: bool = False) -> SOURCE:
        self.data = training_data(train)
        if self.data.index is not None and self.task is None:
            self.task = self.data.index.task()
        if not self.segments or self.task is None:
            raise UserError("SOURCE needs the run's segments (checkpoints with learning rates and steps) and task=")
        self.final_model = self.final_model if self.final_model is not None else self.segments[-1].checkpoints[-1]
        cfg = self.config
        self.curvatures = [
            fit_curvature(seg.checkpoints, self.task, self.data.records, cfg.modules, cfg.curvature, progress=progress) for seg in self.segments
        ]
        return self

    def score_blocks(self, queries, measurement: Measurement, by: str | None = None) -> Blocks:
        data, cfg = self.fitted(), self.config
        records, _ = query_records(queries)
        names = list(self.curvatures[0].modules)
        q = record_gradients(GradientCollector(self.final_model, self.task, ProjectionConfig("none"), names), records, measurement, cfg.batch_size)
        q = {n: g.double() for n, g in q.items()}
        total, ids = 0.0, None
        for seg, curv in zip(reversed(self.segments), reversed(self.curvatures)):
            eta_k = seg.lr * seg.steps / (1 - (cfg.momentum if seg.momentum is None else seg.momentum))
            r = {n: curv.modules[n].apply(g, _f(eta_k)) for n, g in q.items()}
            for ckpt in seg.checkpoints:  # ḡ_ℓ(z) = mean over the segment's checkpoints
                collector = GradientCollector(ckpt, self.task, ProjectionConfig("none"), names)
                blocks = list(stream_scores(collector, data.records, r, batch_size=cfg.batch_size))
                ids = np.concatenate([b[1] for b in blocks])
                total = total + torch.cat([b[2] for b in blocks]).double() / len(seg.checkpoints)
            q = {n: curv.modules[n].apply(g, lambda e: torch.exp(-eta_k * e)) for n, g in q.items()}
        yield 0, ids, total


def segments_from_config(checkpoints: list[torch.nn.Module], config: SourceConfig, steps_of: list[int] | None = None) -> list[Segment]:
    """One segment per checkpoint, from `trainer_state` (with each checkpoint's global step in
    `steps_of`) or from the explicit `checkpoint_lr` and `checkpoint_steps`."""
    if config.trainer_state:
        if steps_of is None:
            raise UserError("with --trainer-state, each checkpoint's global step is needed (name the folders checkpoint-<step>)")
        return segments_from_trainer_state(config.trainer_state, dict(zip(steps_of, checkpoints)))
    lrs, steps = config.checkpoint_lr, config.checkpoint_steps
    if not lrs or not steps or len(lrs) != len(checkpoints) or len(steps) != len(checkpoints):
        raise UserError("SOURCE needs --trainer-state, or one --checkpoint-lr and one --checkpoint-steps per checkpoint")
    return [Segment([m], lr, k) for m, lr, k in zip(checkpoints, lrs, steps)]


def segments_from_trajectory(trajectory: Trajectory, model: torch.nn.Module) -> list[Segment]:
    """One segment per recorded stage: its end checkpoint, its mean learning rate (times the
    clipping factors) over its steps, and its SGD momentum (Adam stages: none; SOURCE's
    exp(−ηK·H) then treats them as SGD steps, see the method's limits)."""
    segments = []
    for stage in trajectory.stages:
        steps = trajectory.steps[stage.start : stage.stop]
        momentum = steps[0].momentum[0] if steps[0].kind == "sgd" else 0.0
        lr = trajectory.learning_rate_sum(stage.name) / len(steps)
        segments.append(Segment([trajectory.checkpoint(stage.name, model)], lr, len(steps), momentum))
    return segments
