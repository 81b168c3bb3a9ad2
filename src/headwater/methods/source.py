"""SOURCE (arXiv 2405.12186): influence along a training trajectory split into segments.

The run's checkpoints are grouped into segments ℓ = 1…L, each with learning rate η_ℓ and K_ℓ
steps. Within a segment the Hessian H̄_ℓ (EK-FAC pooled over its checkpoints) and each training
example's gradient ḡ_ℓ(z) (mean over its checkpoints) are treated as constant. Walking the
query backwards from the end of training,

    q_L = ∇L(query; θ_T),   r_ℓ = F(H̄_ℓ) q_ℓ,   q_{ℓ-1} = exp(−η_ℓ K_ℓ H̄_ℓ) q_ℓ,
    τ(z) = Σ_ℓ r_ℓ · ḡ_ℓ(z),       F(σ) = (1 − e^{−ηKσ}) / σ   (→ ηK as σ → 0).

τ(z) is positive when training on z lowers the query loss (helps). With heavy-ball momentum β
the effective step is η K / (1 − β).

Adam steps are θ ← θ − η P ∇L with P = 1/(√v̂ + ε) from the second moments (v̂ floored, see
`adam_scale_of`), so the segment's linearised map is exp(−ηK P H̄), not exp(−ηK H̄). Keeping
only the diagonal of P in H̄'s
eigenbasis, p̃ = diag(Qᵀ P Q) ((Q_S²)ᵀ P (Q_A²) for a Kronecker basis), each eigendirection
gets its own step ηK·p̃ in both F and the propagation (the P in front of the gradient cancels
one p̃: F̃(σ) = (1 − e^{−ηK p̃ σ})/σ). Two limits pin the construction: ηK → 0 gives TracIn at
one checkpoint (τ = ηK ∇L(q)·∇L(z)); ηK → ∞ gives the influence function ∇L(q)ᵀH⁻¹∇L(z).
"""

from __future__ import annotations

import dataclasses
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
from ..normalizer import OPTIMIZER_FILES, V_FLOOR, floored, load_optimizer_state, param_states
from ..stages.trajectory import Trajectory
from ..task import Task
from .base import Blocks, Method, query_records, training_data
from .influence import record_gradients, stream_scores


@dataclass
class Segment:
    """Checkpoints of one stretch of training, its learning rate, its number of steps and, when
    known, its heavy-ball momentum (default: SourceConfig.momentum) or, for Adam, its per-parameter
    step scale (`adam_scale`, e.g. from `adam_scale_of`)."""

    checkpoints: list[torch.nn.Module]
    lr: float
    steps: int
    momentum: float | None = None
    adam_scale: dict[str, torch.Tensor] | None = None  # parameter name -> P = 1/(√v̂ + ε), shaped as the parameter

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


def adam_scale_of(exp_avg_sq: dict[str, torch.Tensor], step: int, beta2: float, eps: float, floor: float = V_FLOOR) -> dict[str, torch.Tensor]:
    """Adam's step scale P = 1/(√v̂ + ε) per parameter from its second moments after `step` steps,
    with each tensor's v̂ floored at `floor` times its mean (`normalizer.floored`: on the tiny
    GPT-2 of `benchmarks/lds.py` SOURCE's LDS is 0.642 without the floor and 0.855–0.858 with any
    floor from 1e-6 to 1, docs/benchmarks.md)."""
    if step < 1:
        raise UserError("Adam's step scale needs the second moments after at least one step")
    return {n: 1 / (floored(v.double() / (1 - beta2**step), floor).sqrt() + eps) for n, v in exp_avg_sq.items()}


def adam_scale_from_checkpoint(model: torch.nn.Module, path: str | Path) -> dict[str, torch.Tensor] | None:
    """Adam's step scale P at a checkpoint, from the optimizer state saved with it (a Hugging Face
    Trainer `checkpoint-<step>` folder's optimizer.pt, or a state file); None when the folder holds
    no optimizer state or the optimizer kept no second moments (SGD, Adafactor)."""
    path = Path(path)
    if path.is_dir() and not any((path / f).exists() for f in OPTIMIZER_FILES):
        return None
    scale = {}
    for name, (state, group) in param_states(model, load_optimizer_state(path)).items():
        if "exp_avg_sq" not in state or "step" not in state:
            return None
        step = int(float(state["step"]))  # a tensor, a number or a numpy scalar, as optimizers save it
        scale.update(adam_scale_of({name: state["exp_avg_sq"]}, step, group["betas"][1], group["eps"]))
    return scale


def _step_sizes(eta_k: float, seg: Segment, tm, curv) -> float | torch.Tensor:
    """ηK per eigendirection [d_out, d_in_aug] for Adam segments (ηK·p̃), else the number ηK."""
    if seg.adam_scale is None:
        return eta_k
    weight, bias = tm.weight_name, tm.bias_name
    missing = [p for p in (weight, bias)[: 1 + tm.has_bias] if p not in seg.adam_scale]
    if missing:
        raise UserError(f"the segment's Adam step scale has no entry for {missing[0]!r}")
    scale = tm.weight_matrix(seg.adam_scale[weight].double())
    if tm.has_bias:
        scale = torch.cat([scale, seg.adam_scale[bias].double()[:, None]], 1)
    return eta_k * (curv.q_s.double().square().T @ scale @ curv.q_a.double().square())


def _f(eta_k: float | torch.Tensor):
    """F(σ) = (1 − e^{−ηKσ})/σ, with the σ → 0 limit ηK (ηK a number or one per eigendirection)."""

    def fn(sigma: torch.Tensor) -> torch.Tensor:
        safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
        return torch.where(sigma > 0, -torch.expm1(-eta_k * safe) / safe, eta_k * torch.ones_like(sigma))

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
        # Kronecker blocks throughout: its Adam step sizes are per Kronecker eigendirection, and whole blocks unrolled worse (docs/benchmarks.md)
        if cfg.curvature.dense_conv_blocks:
            raise UserError("SOURCE uses the Kronecker-factored blocks only: leave --dense-conv-blocks unset (or 0)")
        curvature = dataclasses.replace(cfg.curvature, dense_conv_blocks=0)
        self.curvatures = [
            fit_curvature(seg.checkpoints, self.task, self.data.records, cfg.modules, curvature, progress=progress) for seg in self.segments
        ]
        return self

    def score_blocks(self, queries, measurement: Measurement, by: str | None = None) -> Blocks:
        data, cfg = self.fitted(), self.config
        records, _ = query_records(queries)
        names = list(self.curvatures[0].modules)
        final = GradientCollector(self.final_model, self.task, ProjectionConfig("none"), names)
        q = {n: g.double() for n, g in record_gradients(final, records, measurement, cfg.batch_size).items()}
        total, ids = 0.0, None
        for seg, curv in zip(reversed(self.segments), reversed(self.curvatures)):
            eta_k = seg.lr * seg.steps / (1 - (cfg.momentum if seg.momentum is None else seg.momentum))
            eta = {n: _step_sizes(eta_k, seg, final.modules[n], curv.modules[n]) for n in q}
            r = {n: curv.modules[n].apply(g, _f(eta[n])) for n, g in q.items()}
            for ckpt in seg.checkpoints:  # ḡ_ℓ(z) = mean over the segment's checkpoints
                collector = GradientCollector(ckpt, self.task, ProjectionConfig("none"), names)
                blocks = list(stream_scores(collector, data.records, r, batch_size=cfg.batch_size))
                ids = np.concatenate([b[1] for b in blocks])
                total = total + torch.cat([b[2] for b in blocks]).double() / len(seg.checkpoints)
            q = {n: curv.modules[n].apply(g, lambda e, n=n: torch.exp(-eta[n] * e)) for n, g in q.items()}
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
    clipping factors) over its steps, and its SGD momentum or, for Adam stages, the step scale
    from the second moments recorded at the stage's end (Adam's first moment averages gradients,
    so it does not lengthen the step as heavy-ball momentum does)."""
    segments = []
    for stage in trajectory.stages:
        steps = trajectory.steps[stage.start : stage.stop]
        last = steps[-1]
        momentum = steps[0].momentum[0] if steps[0].kind == "sgd" else 0.0
        scale = None
        if last.kind == "adam":
            v = trajectory.moments_at(stage.name, True).get("exp_avg_sq", {})
            scale = adam_scale_of(v, last.count, last.beta2[0], last.eps[0]) if v else None
        lr = trajectory.learning_rate_sum(stage.name) / len(steps)
        segments.append(Segment([trajectory.checkpoint(stage.name, model)], lr, len(steps), momentum, scale))
    return segments
