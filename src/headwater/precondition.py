"""Block-diagonal gradient preconditioners in projected space (TrackStar's R^{-1/2}).

R is an autocorrelation matrix of projected gradients, one block per tracked module:
R_b = (1/n) Σ_i g_{i,b} g_{i,b}ᵀ. TrackStar mixes the training corpus's R with the queries' R,
R = λ R_eval + (1-λ) R_train, with λ matching their k-th eigenvalues, and applies the damped
inverse square root U diag((σ + d·mean σ)^{-1/2}) Uᵀ to both sides of every dot product.
Mixing in R_eval down-weights directions every query shares (the question template); R_train
down-weights directions every training document shares (boilerplate, common tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .errors import UserError

MAX_BLOCK = 16384


def autocorrelation(rows: torch.Tensor, blocks: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Per-block (1/n) GᵀG in float64 for rows G [n, dim]; one [d_b, d_b] matrix per block."""
    if rows.shape[0] == 0:
        raise UserError("cannot fit a preconditioner on zero rows")
    for a, b in blocks:
        if b - a > MAX_BLOCK:
            raise UserError(f"a gradient block of {b - a} dims is too large for TrackStar's preconditioner; build the index with a projection")
    finite = torch.isfinite(rows).all(1)
    if not finite.all():
        raise UserError(
            f"{int((~finite).sum())} of {len(rows)} sampled gradient rows hold inf or NaN (float16 storage overflows "
            "above 65504, which optimizer-normalised gradients reach): rebuild the index with --storage-dtype bfloat16 or float32"
        )
    g = rows.double()
    return [g[:, a:b].T @ g[:, a:b] / g.shape[0] for a, b in blocks]


def mixing_weight(eig_train: torch.Tensor, eig_eval: torch.Tensor, k: int) -> float:
    """λ with λ σ_eval[k] = (1-λ) σ_train[k] (eigenvalues sorted descending; k clipped to both ranks)."""
    k = min(k, numerical_rank(eig_train) - 1, numerical_rank(eig_eval) - 1)
    if k < 0:  # a zero matrix on one side
        return 0.5
    s_t, s_e = float(eig_train[k]), float(eig_eval[k])
    return s_t / (s_t + s_e)


def numerical_rank(eig: torch.Tensor) -> int:
    """Eigenvalues of a PSD matrix above round-off (tolerance as in `numpy.linalg.matrix_rank`)."""
    top = float(eig.max()) if len(eig) else 0.0
    return int((eig > top * len(eig) * torch.finfo(torch.float64).eps).sum()) if top > 0 else 0


@dataclass
class BlockPreconditioner:
    """Per-block matrices M_b [d_b, d_b] (float64); `apply(G)` returns G with each block times M_b."""

    blocks: list[tuple[int, int]]
    matrices: list[torch.Tensor]
    mix: list[float]
    cast: dict = field(default_factory=dict, repr=False)  # the matrices in each (dtype, device) rows came in

    def apply(self, rows: torch.Tensor) -> torch.Tensor:
        key = (rows.dtype, rows.device)
        if key not in self.cast:
            self.cast[key] = [m.to(rows) for m in self.matrices]
        out = torch.empty_like(rows)
        for (a, b), m in zip(self.blocks, self.cast[key]):
            out[:, a:b] = rows[:, a:b] @ m
        return out


def damped_inverse_sqrt(r: torch.Tensor, damping: float) -> torch.Tensor:
    """U diag((σ + damping·mean σ)^{-1/2}) Uᵀ for a symmetric PSD R, in float64.

    Round-off can leave R slightly asymmetric or with tiny negative eigenvalues: it is
    symmetrised and its eigenvalues clamped at 0. If LAPACK's eigensolver still fails (R spanning
    many orders of magnitude), the eigenvalues are found on R scaled to unit trace.
    """
    r = (r.double() + r.double().T) / 2
    scale = float(r.diagonal().mean())
    if not math.isfinite(scale) or scale <= 0:
        raise UserError("the gradient autocorrelation is zero or not finite: every sampled row is zero, or the rows overflowed")
    try:
        sigma, u = torch.linalg.eigh(r / scale)
    except torch.linalg.LinAlgError:
        raise UserError(
            f"TrackStar's preconditioner could not be computed: the eigendecomposition of a {len(r)}×{len(r)} "
            "gradient autocorrelation did not converge; try a larger --damping or a smaller --projection-dim"
        ) from None
    sigma = sigma.clamp_min(0) * scale
    lam = damping * sigma.mean()
    if lam <= 0:
        lam = torch.tensor(1e-12 * scale, dtype=sigma.dtype)
    return (u * (sigma + lam).rsqrt()) @ u.T


def trackstar_preconditioner(
    r_train: list[torch.Tensor],
    r_eval: list[torch.Tensor] | None,
    blocks: list[tuple[int, int]],
    mix: float | str = "auto",
    damping: float = 0.1,
    k: int = 1000,
) -> BlockPreconditioner:
    """R^{-1/2} per block from the training autocorrelation and optionally the queries' (both
    from `autocorrelation`). `mix="auto"` chooses λ by eigenvalue matching; a number in [0, 1]
    fixes it; `r_eval=None` or `mix=0` uses the training autocorrelation alone.
    """
    matrices, lams = [], []
    for i, rt in enumerate(r_train):
        if r_eval is None or mix == 0:
            lam = 0.0
        elif mix == "auto":
            lam = mixing_weight(torch.linalg.eigvalsh(rt).flip(0), torch.linalg.eigvalsh(r_eval[i]).flip(0), k)
        else:
            lam = float(mix)
        r = rt if lam == 0 else lam * r_eval[i] + (1 - lam) * rt
        matrices.append(damped_inverse_sqrt(r, damping))
        lams.append(lam)
    return BlockPreconditioner(blocks, matrices, lams)
