"""Block-diagonal gradient preconditioners in projected space (TrackStar's R^{-1/2}).

R is an autocorrelation matrix of projected gradients, one block per tracked module:
R_b = (1/n) Σ_i g_{i,b} g_{i,b}ᵀ. TrackStar mixes the training corpus's R with the queries' R,
R = λ R_eval + (1-λ) R_train, with λ matching their k-th eigenvalues, and applies the damped
inverse square root U diag((σ + d·mean σ)^{-1/2}) Uᵀ to both sides of every dot product.
Mixing in R_eval down-weights directions every query shares (the question template); R_train
down-weights directions every training document shares (boilerplate, common tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UserError

MAX_BLOCK = 16384


def autocorrelation(rows: torch.Tensor, blocks: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Per-block (1/n) GᵀG in float64 for rows G [n, dim]; one [d_b, d_b] matrix per block."""
    if rows.shape[0] == 0:
        raise UserError("cannot fit a preconditioner on zero rows")
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
    """Per-block matrices M_b [d_b, d_b]; `apply(G)` returns G with each block multiplied by M_b."""

    blocks: list[tuple[int, int]]
    matrices: list[torch.Tensor]
    mix: list[float]

    def apply(self, rows: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(rows)
        for (a, b), m in zip(self.blocks, self.matrices):
            out[:, a:b] = rows[:, a:b] @ m.to(rows)
        return out


def damped_inverse_sqrt(r: torch.Tensor, damping: float) -> torch.Tensor:
    """U diag((σ + damping·mean σ)^{-1/2}) Uᵀ for a symmetric PSD R (float64 eigendecomposition)."""
    sigma, u = torch.linalg.eigh(r)
    sigma = sigma.clamp_min(0)
    lam = damping * sigma.mean()
    if lam <= 0:
        lam = torch.tensor(1e-12, dtype=sigma.dtype)
    return (u * (sigma + lam).rsqrt()) @ u.T


def trackstar_preconditioner(
    train_rows: torch.Tensor,
    query_rows: torch.Tensor | None,
    blocks: list[tuple[int, int]],
    mix: float | str = "auto",
    damping: float = 0.1,
    k: int = 1000,
) -> BlockPreconditioner:
    """R^{-1/2} per block from a training sample [n, dim] and optionally the query gradients [q, dim].

    `mix="auto"` chooses λ by eigenvalue matching; a number in [0, 1] fixes λ; `query_rows=None`
    or `mix=0` uses the training autocorrelation alone.
    """
    for a, b in blocks:
        if b - a > MAX_BLOCK:
            raise UserError(f"a gradient block of {b - a} dims is too large for TrackStar's preconditioner; build the index with a projection")
    r_train = autocorrelation(train_rows, blocks)
    r_eval = autocorrelation(query_rows, blocks) if query_rows is not None and mix != 0 else None
    matrices, lams = [], []
    for i, rt in enumerate(r_train):
        if r_eval is None:
            lam = 0.0
        elif mix == "auto":
            lam = mixing_weight(torch.linalg.eigvalsh(rt).flip(0), torch.linalg.eigvalsh(r_eval[i]).flip(0), k)
        else:
            lam = float(mix)
            if not 0 <= lam <= 1:
                raise UserError(f"TrackStar mixing weight must be in [0, 1] or 'auto', got {mix}")
        r = rt if r_eval is None else lam * r_eval[i] + (1 - lam) * rt
        matrices.append(damped_inverse_sqrt(r, damping).float())
        lams.append(lam)
    return BlockPreconditioner(blocks, matrices, lams)
