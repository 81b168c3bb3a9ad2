"""A later stage's curvature at scale: its EK-FAC eigenbasis, as SOURCE uses.

The exact curvature estimator takes a curvature-vector product of every later step's batch, a
forward and backward pass per step and stage. At scale each later stage's curvature is held at
one EK-FAC fit instead (`fit_curvature`, pooled over the stage's start and end checkpoints, on its
records): a tracked module's block is C ≈ Q diag(Λ) Qᵀ with Q = Q_S ⊗ Q_A (or a convolution's
whole block, U diag(σ) Uᵀ in that basis). In Q's basis the linearised update of every step acts
on each eigendirection alone, so a gap entering the stage is rotated once, carried through the
stage's steps elementwise (the cost of first-order propagation), and rotated back. This is
SOURCE's exp(−ηK(Λ + λ)) made step by step: each step's learning rate, clipping factor,
momentum and decay as recorded, in place of one ηK/(1 − μ) per segment.

Adam's step is preconditioned per parameter (P = 1/(√v̂ + ε)), which the eigenbasis does not
diagonalise. With SOURCE's diagonal of P in the basis, diag(Qᵀ P Q), the estimates were worse
than the naive one on two of the three Trainer pipelines of benchmarks/stages.py (from scratch:
Pearson 0.699 against 0.840; fine-tuning at × 0.3: RMSE 0.27 against 0.25), where crossing in
parameter space gives 0.830 and 0.15. So an Adam stage is crossed in parameter space, one basis
product per step (two matrix products per module, as an EK-FAC inverse takes): no forward or
backward pass.

KFAC keeps each module's block alone, and a stage's displacement is gradient-like: its parts in
different layers move the outputs together, so the blocks between layers carry much of its
curvature (on the tiny GPT-2 of benchmarks/stages.py, EK-FAC's dᵀCd along a stage's
displacement was 1/15 of the Gauss–Newton matrix's, and EK-FAC alone estimated about as well as
first-order propagation). `corrected` makes the curvature exact on a few directions: the span of
the gaps entering the stage and their curvature products.

What the basis approximates, beyond the curvature itself:
- in an SGD stage's eigen-coordinates a module's bias takes its weight's settings (decay,
  momentum): they act per parameter, and the basis mixes the two; a bias outside weight decay
  is decayed as its weight is;
- parameters outside the tracked modules (embeddings, norms) have curvature only through the
  correction;
- the Fisher is per example (each example's summed loss); a token-mean run's batch loss is
  divided by its targets, so its curvature is the Fisher times examples / targets.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

from ..collect import TrackedModule
from ..curvature import Curvature, ModuleCurvature
from ..errors import UserError
from .propagation import ParamSpace, StepMap, forward


class StageEigenbasis:
    """One stage's curvature in the trajectory's flat layout: every tracked module's weight (and
    bias) elements are re-read as coordinates in its eigenbasis, in place."""

    def __init__(self, curvature: Curvature, modules: dict[str, TrackedModule], space: ParamSpace, scale: float = 1.0):
        offsets = dict(zip(space.names, torch.tensor([0, *space.sizes[:-1]]).cumsum(0).tolist()))
        self.blocks: list[tuple[torch.Tensor, ModuleCurvature]] = []  # (flat positions [d_out, d_in_aug], block)
        self.eigenvalues = torch.zeros(space.size, dtype=torch.float64)  # [P]: 0 outside the tracked modules
        for name, block in curvature.modules.items():
            if name not in modules:
                raise UserError(f"the EK-FAC fit has a module {name!r} that is not a linear module of the model")
            tm = modules[name]
            if tm.weight_name not in offsets or (tm.has_bias and tm.bias_name not in offsets):
                continue  # a parameter the run did not train
            start = offsets[tm.weight_name]
            positions = tm.weight_matrix(torch.arange(start, start + tm.d_out * tm.d_in).reshape(space.shapes[tm.weight_name]))
            if tm.has_bias:
                bias = offsets[tm.bias_name]
                positions = torch.cat([positions, torch.arange(bias, bias + tm.d_out)[:, None]], 1)
            self.blocks.append((positions, block))
            self.eigenvalues[positions.reshape(-1)] = scale * block.eigenvalues().double().reshape(-1)
        self._settings: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (a setting, as in the basis)
        self.subspace: torch.Tensor | None = None  # U [r, P], orthonormal, in eigen-coordinates
        self.correction: torch.Tensor | None = None  # M [r, r]: the exact curvature minus the basis's, on U

    def corrected(self, vectors: torch.Tensor, products: torch.Tensor) -> StageEigenbasis:
        """This basis with the curvature made exact on the span of orthonormal `vectors` V [r, P],
        given their exact products C V [r, P]: C ≈ C_basis + V M Vᵀ, M = Vᵀ C V − Vᵀ C_basis V."""
        out = copy.copy(self)
        u = self.rotate(vectors)
        exact = vectors @ products.T
        out.subspace, out.correction = u, (exact + exact.T) / 2 - (u * self.eigenvalues) @ u.T
        return out

    def rotate(self, v: torch.Tensor) -> torch.Tensor:
        """Vectors [B, P] with each tracked module's elements as eigen-coordinates."""
        out = v.clone()
        for positions, block in self.blocks:
            r = block.rotate(v[:, positions])  # [B, d_out, d_in_aug]
            if block.block is not None:
                r = r.reshape(len(v), -1) @ block.block[1].to(r)
            out[:, positions.reshape(-1)] = r.reshape(len(v), -1)
        return out

    def unrotate(self, v: torch.Tensor) -> torch.Tensor:
        """The inverse of `rotate` (the bases are orthonormal)."""
        out = v.clone()
        for positions, block in self.blocks:
            r = v[:, positions.reshape(-1)]
            if block.block is not None:
                r = r @ block.block[1].to(r).T
            out[:, positions] = block.unrotate(r.reshape(len(v), *positions.shape))
        return out

    def products(self, v: torch.Tensor) -> torch.Tensor:
        """C V [B, P] for vectors V [B, P]."""
        return self.unrotate(self._diagonal_products(self.rotate(v)))

    def _diagonal_products(self, x: torch.Tensor) -> torch.Tensor:
        """C X [B, P] for X [B, P] in eigen-coordinates: Λ ⊙ X, plus the subspace's correction."""
        out = self.eigenvalues * x
        if self.subspace is not None:
            out = out + (x @ self.subspace.T) @ self.correction @ self.subspace
        return out

    def _per_module(self, values: torch.Tensor) -> torch.Tensor:
        """A per-element setting [P] with each tracked module's elements set to its weight's (the
        setting itself when they already agree, as they usually do: no copy per step)."""
        if id(values) not in self._settings:  # the step maps share their settings' tensors
            out = values
            if any(bool((values[positions] != values[positions[0, 0]]).any()) for positions, _ in self.blocks):
                out = values.clone()
                for positions, _ in self.blocks:
                    out[positions] = values[positions[0, 0]]
            self._settings[id(values)] = (values, out)  # the tensor is kept so that its id is not reused
        return self._settings[id(values)][1]

    def step_map(self, m: StepMap) -> StepMap:
        """SGD step m's linearised update as it acts on eigen-coordinates."""
        return replace(m, **{f: self._per_module(getattr(m, f)) for f in ("lr", "coupled", "decay", "momentum", "dampening", "nesterov")})

    def carry(self, maps: list[StepMap], d_theta: torch.Tensor, d_m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(δθ, δm) [B, P] each after the stage's steps `maps`, from the gaps entering the stage."""
        if any(m.kind == "adam" for m in maps):
            for m in maps:
                d_theta, d_m = forward(m, d_theta, d_m, self.products(d_theta))
            return d_theta, d_m
        x, y = self.rotate(torch.cat([d_theta, d_m])).split(len(d_theta))
        for m in maps:
            x, y = forward(self.step_map(m), x, y, self._diagonal_products(x))
        x, y = self.unrotate(torch.cat([x, y])).split(len(d_theta))
        return x, y
