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
from ..curvature import CurvatureConfig, fit_curvature
from ..errors import UserError
from ..projection import ProjectionConfig
from ..task import Task
from .influence import loss_gradients, stream_scores


@dataclass
class Segment:
    """Checkpoints of one stretch of training, its learning rate and its number of steps."""

    checkpoints: list[torch.nn.Module]
    lr: float
    steps: int

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


def source_scores(
    final_model: torch.nn.Module,
    task: Task,
    train_records,
    queries,
    segments: list[Segment],
    curvature: CurvatureConfig | None = None,
    momentum: float = 0.0,
    modules: list[str] | None = None,
    batch_size: int = 16,
    curvature_records=None,
    progress: bool = False,
) -> np.ndarray:
    """SOURCE scores [n_train, q] over `segments` (in training order) of the run ending at
    `final_model`. EK-FAC per segment is fitted on `curvature_records` (default: the training data)."""
    if not segments:
        raise UserError("SOURCE needs at least one segment")
    if not 0 <= momentum < 1:
        raise UserError(f"momentum must be in [0, 1), got {momentum}")
    config = curvature or CurvatureConfig()
    q = loss_gradients(GradientCollector(final_model, task, ProjectionConfig("none"), modules), queries, batch_size)
    q = {n: g.double() for n, g in q.items()}
    total = 0.0
    for seg in reversed(segments):
        curv = fit_curvature(seg.checkpoints, task, curvature_records if curvature_records is not None else train_records, modules, config, progress=progress)
        eta_k = seg.lr * seg.steps / (1 - momentum)
        r = {n: curv.modules[n].apply(g, _f(eta_k)) for n, g in q.items()}
        for ckpt in seg.checkpoints:  # ḡ_ℓ(z) = mean over the segment's checkpoints
            collector = GradientCollector(ckpt, task, ProjectionConfig("none"), list(q))
            total = total + stream_scores(collector, task, train_records, r, batch_size=batch_size, progress=progress) / len(seg.checkpoints)
        q = {n: curv.modules[n].apply(g, lambda e: torch.exp(-eta_k * e)) for n, g in q.items()}
    return np.asarray(total)

