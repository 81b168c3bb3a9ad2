"""Seeded random projections of per-module gradients, regenerated on demand, never stored.

Each tracked linear module's gradient is the matrix DW_aug = Σ_t δ_t [a_t; 1]ᵀ of shape
[d_out, d_in + 1] (bias as the last column). Three compressions map it to a row segment:

- `factored` (LoGra): P_out DW_aug P_inᵀ with P_out [k_out, d_out], P_in [k_in, d_in + 1],
  flattened to k_out·k_in values; computed from projected activations and output gradients so the
  full gradient is never formed.
- `dense`: P vec(DW_aug) with P [k, d_out·(d_in + 1)] Gaussian, generated in column blocks.
- `none`: vec(DW_aug) itself.

Entries have variance 1/k on each side so squared norms are preserved in expectation.
"""

from __future__ import annotations

import hashlib
import math

import torch

from .config import ProjectionConfig

DENSE_BLOCK_COLUMNS = 1 << 16


def derived_seed(seed: int, *parts: object) -> int:
    """A 63-bit generator seed from the base seed and a description (module name, role, shape)."""
    digest = hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def gaussian(rows: int, cols: int, seed: int, *parts: object) -> torch.Tensor:
    """A [rows, cols] float32 matrix of N(0, 1/rows) entries, identical on every machine."""
    gen = torch.Generator(device="cpu").manual_seed(derived_seed(seed, *parts, rows, cols))
    return torch.randn(rows, cols, generator=gen) / math.sqrt(rows)


def factored_matrices(cfg: ProjectionConfig, name: str, d_out: int, d_in_aug: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(P_out [k_out, d_out], P_in [k_in, d_in + 1]) for one module."""
    k_out, k_in = cfg.factors()
    return gaussian(k_out, d_out, cfg.seed, name, "out"), gaussian(k_in, d_in_aug, cfg.seed, name, "in")


def dense_blocks(cfg: ProjectionConfig, name: str, n: int):
    """Yield (start, stop, P_block [dim, stop-start]) covering the columns of the dense projection."""
    for start in range(0, n, DENSE_BLOCK_COLUMNS):
        stop = min(n, start + DENSE_BLOCK_COLUMNS)
        gen = torch.Generator(device="cpu").manual_seed(derived_seed(cfg.seed, name, "dense", n, start))
        yield start, stop, torch.randn(cfg.dim, stop - start, generator=gen) / math.sqrt(cfg.dim)


def project(cfg: ProjectionConfig, name: str, grad: torch.Tensor) -> torch.Tensor:
    """Reference projection of full gradients `grad` [B, d_out, d_in + 1] → [B, segment_dim].

    The collector never calls this on the factored path (it projects activations instead); tests
    use it to check the collector against autograd, and the dense/none paths use it directly.
    """
    B, d_out, d_in_aug = grad.shape
    if cfg.kind == "none":
        return grad.reshape(B, -1)
    if cfg.kind == "factored":
        p_out, p_in = (p.to(grad) for p in factored_matrices(cfg, name, d_out, d_in_aug))
        return (p_out @ grad @ p_in.T).reshape(B, -1)
    flat = grad.reshape(B, -1)
    out = flat.new_zeros(B, cfg.dim)
    for start, stop, block in dense_blocks(cfg, name, flat.shape[1]):
        out += flat[:, start:stop] @ block.to(flat).T
    return out
