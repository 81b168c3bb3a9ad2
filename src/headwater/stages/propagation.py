"""The recorded optimizer steps, linearised: how a gap in the parameters and the optimizer state at
one step carries through every later step, and the adjoint of that map.

Each step follows its optimizer exactly as torch.optim does (per parameter group):

    SGD:   g = c·∇L + λ_c θ;   b = μ b + (1−τ) g  (b = g on the first step);   d = g + μ b (Nesterov) or b
           θ ← (1 − η λ_d) θ − η d
    Adam:  g = c·∇L + λ_c θ;   m = β1 m + (1−β1) g;   θ ← (1 − η λ_d) θ − η P m / (1 − β1^n)

with c the clipping factor actually applied, λ_c the coupled (L2) and λ_d the decoupled weight
decay, and Adam's preconditioner P = 1/(√v̂ + ε) held at the value recorded for the stage (its
second moment at the stage's end, bias-corrected). Linearised around the recorded run, a gap
(δθ, δm) moves as the same recursion with ∇L replaced by H δθ (H the Hessian of the step's batch
loss; H = 0 for first-order propagation). Re-creating the optimizer zeroes the moment gap.

An Adam step replayed with its own moments (`AdamStep`, `forward_adam`) takes its own P and the
second moment's response as well: the gap carries δv, δv' = β2 δv + 2(1 − β2) g δg, and the step
moves by −η m̂ δv̂ / (2√v̂ (√v̂ + ε)²) more. `adjoint` keeps the stage's P and no δv.

`adjoint` carries behaviour vectors backwards through these maps, so one pass gives, at every
stage boundary, the sensitivity of the final measurement to the parameter and moment gaps there,
and at every step the sensitivity to that step's data gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .trajectory import StepRecord, Trajectory

HVP = Callable[[int, torch.Tensor], torch.Tensor]  # (step, vectors [B, P]) -> H_step @ vectors


class ParamSpace:
    """Flattens {parameter name: tensor} into one float64 vector, in the trajectory's order."""

    def __init__(self, names: list[str], shapes: dict[str, torch.Size]):
        self.names, self.shapes = names, shapes
        self.sizes = [int(torch.Size(shapes[n]).numel()) for n in names]
        self.size = sum(self.sizes)

    def flatten(self, tensors: dict[str, torch.Tensor], missing: float = 0.0) -> torch.Tensor:
        parts = [
            tensors[n].detach().reshape(-1).double() if n in tensors else torch.full((k,), missing, dtype=torch.float64)
            for n, k in zip(self.names, self.sizes)
        ]
        return torch.cat(parts)

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: part.reshape(self.shapes[n]) for n, part in zip(self.names, torch.split(vector, self.sizes))}

    def per_group(self, groups: list[list[str]], values: list) -> torch.Tensor:
        """A per-element vector holding each parameter's group value."""
        of = {n: values[g] for g, names in enumerate(groups) for n in names}
        return torch.cat([torch.full((k,), float(of.get(n, values[0])), dtype=torch.float64) for n, k in zip(self.names, self.sizes)])


@dataclass
class StepMap:
    """One step's linearised update, as per-element vectors."""

    kind: str
    lr: torch.Tensor
    coupled: torch.Tensor  # λ_c
    decay: torch.Tensor  # 1 − η λ_d
    momentum: torch.Tensor  # μ (SGD) or β1 (Adam)
    dampening: torch.Tensor
    nesterov: torch.Tensor  # bool
    clip: float
    first: bool  # the optimizer's first step: SGD's buffer starts as the gradient
    bias: float  # 1 − β1^n (Adam)
    precondition: torch.Tensor | None  # P (Adam)


def step_maps(trajectory: Trajectory, space: ParamSpace, preconditioners: dict[str, torch.Tensor] | None = None) -> list[StepMap]:
    """The linearised map of every recorded step (Adam needs `preconditioners`: P per stage)."""
    maps, cache = [], {}
    for stage in trajectory.stages:
        for t in range(stage.start, stage.stop):
            rec: StepRecord = trajectory.steps[t]
            key = (stage.name, tuple(rec.lr), tuple(rec.weight_decay), tuple(rec.momentum), tuple(rec.dampening), tuple(rec.nesterov), rec.decoupled)
            if key not in cache:
                vec = lambda values: space.per_group(stage.groups, values)
                lr, wd = vec(rec.lr), vec(rec.weight_decay)
                cache[key] = (
                    lr,
                    torch.zeros_like(wd) if rec.decoupled else wd,
                    1 - lr * wd if rec.decoupled else torch.ones_like(wd),
                    vec(rec.momentum),
                    vec(rec.dampening),
                    vec([float(x) for x in rec.nesterov]).bool(),
                )
            lr, coupled, decay, momentum, dampening, nesterov = cache[key]
            pre = None
            if rec.kind == "adam":
                if preconditioners is None or stage.name not in preconditioners:
                    raise ValueError(f"Adam steps of stage {stage.name!r} need its preconditioner")
                pre = preconditioners[stage.name]
            bias = 1 - rec.momentum[0] ** rec.count if rec.kind == "adam" else 1.0
            maps.append(StepMap(rec.kind, lr, coupled, decay, momentum, dampening, nesterov, rec.clip, rec.count == 1, bias, pre))
    return maps


@dataclass
class AdamStep:
    """One Adam step as it ran (from a replay), as the per-element coefficients of its second
    moment's response, [P] each: the step is θ ← … − η m̂/(√v̂ + ε), so a gap moves it by
    η(δm̂/(√v̂ + ε) − m̂ δv̂/(2√v̂ (√v̂ + ε)²)), with δv' = β2 δv + 2(1 − β2) g δg."""

    precondition: torch.Tensor  # 1/(√v̂ + ε) of this step (v̂ floored per tensor; 0 where not stepped)
    response: torch.Tensor  # m̂ / (2√v̂ (√v̂ + ε)² (1 − β2^n)): the step's change per unit of δv
    gradient: torch.Tensor  # 2(1 − β2) g: δv's change per unit of δg
    beta2: float


def forward_adam(m: StepMap, a: AdamStep, dtheta: torch.Tensor, dm: torch.Tensor, dv: torch.Tensor, hvp: torch.Tensor):
    """(δθ, δm, δv) after Adam step m with its own moments `a`: `forward` with the step's second
    moment and that moment's response to the gap; `hvp` is H δθ."""
    dg = m.coupled * dtheta + m.clip * hvp
    dm2 = m.momentum * dm + (1 - m.momentum) * dg
    dv2 = a.beta2 * dv + a.gradient * dg
    return m.decay * dtheta - m.lr * (a.precondition * dm2 / m.bias - a.response * dv2), dm2, dv2


def forward(m: StepMap, dtheta: torch.Tensor, dm: torch.Tensor, hvp: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(δθ, δm) after one step, from the gap before it; `hvp` is H δθ (None: first order)."""
    dg = m.coupled * dtheta + (m.clip * hvp if hvp is not None else 0)
    if m.kind == "adam":
        dm2 = m.momentum * dm + (1 - m.momentum) * dg
        return m.decay * dtheta - m.lr * m.precondition * dm2 / m.bias, dm2
    dm2 = dg if m.first else m.momentum * dm + (1 - m.dampening) * dg
    direction = torch.where(m.nesterov, dg + m.momentum * dm2, dm2)
    return m.decay * dtheta - m.lr * direction, dm2


def backward(m: StepMap, a_theta: torch.Tensor, a_m: torch.Tensor, hvp: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """The transpose of `forward`: from the adjoints of (δθ, δm) after the step, those before it
    and the adjoint γ of the step's data gradient (whose contribution to the update is c·∇L)."""
    if m.kind == "adam":
        a_dm2 = a_m - m.lr * m.precondition * a_theta / m.bias
        a_dm, a_dg = m.momentum * a_dm2, (1 - m.momentum) * a_dm2
    else:
        a_dir = -m.lr * a_theta
        a_dm2 = a_m + torch.where(m.nesterov, m.momentum * a_dir, a_dir)
        a_dg = torch.where(m.nesterov, a_dir, torch.zeros_like(a_dir)) + (1 if m.first else 1 - m.dampening) * a_dm2
        a_dm = torch.zeros_like(a_dm2) if m.first else m.momentum * a_dm2
    a_prev = m.decay * a_theta + m.coupled * a_dg
    if hvp is not None:
        a_prev = a_prev + m.clip * hvp(a_dg)
    return a_prev, a_dm, m.clip * a_dg


def adjoint(
    trajectory: Trajectory,
    maps: list[StepMap],
    q: torch.Tensor,
    hvp: HVP | None = None,
    on_boundary: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> None:
    """Carry behaviour vectors q [B, P] (∂f/∂θ_T) backwards through every step.

    `on_boundary(k, a_θ, a_m)` is called at the end of stage k (after the later stages, before
    any re-creation at the next stage's start is undone: the sensitivity to the gap stage k
    leaves); `on_step(t, γ_t)` with the adjoint [B, P] of step t's data gradient.
    """
    a_theta, a_m = q.double(), torch.zeros_like(q, dtype=torch.float64)
    for k in range(len(trajectory.stages) - 1, -1, -1):
        stage = trajectory.stages[k]
        if on_boundary is not None:
            on_boundary(k, a_theta, a_m)
        for t in range(stage.stop - 1, stage.start - 1, -1):
            h = (lambda v, t=t: hvp(t, v)) if hvp is not None else None
            a_theta, a_m, gamma = backward(maps[t], a_theta, a_m, h)
            if on_step is not None:
                on_step(t, gamma)
        if stage.recreated:
            a_m = torch.zeros_like(a_m)  # a fresh optimizer: the state before it does not reach later steps
