"""Gradient-similarity scorers over a stored index: dot product, cosine, TrackStar.

Every scorer follows the library sign convention: stored rows and query rows are gradients of
losses, so a positive score means a gradient step on the training example lowers the query loss
(the example helps the queried behaviour).

A scorer is fitted once on the query gradients (and, for TrackStar, a training sample) and then
scores blocks of stored rows: `score(rows [b, dim]) -> [b, q]`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..precondition import BlockPreconditioner, trackstar_preconditioner
from ..store import GradientStore

EPS = 1e-12


class Scorer:
    """Base: dot product of raw rows with raw queries."""

    name = "dot"
    normalize = False

    def __init__(self):
        self.q: torch.Tensor | None = None

    def transform(self, rows: torch.Tensor) -> torch.Tensor:
        """Map stored or query rows [n, dim] into the space where scores are dot products."""
        return F.normalize(rows, dim=1, eps=EPS) if self.normalize else rows

    def fit(self, store: GradientStore, queries: torch.Tensor, aggregate: bool = False) -> "Scorer":
        """Prepare the query side from query gradients [q, dim]; `aggregate` averages them into one."""
        if queries.shape[1] != store.dim:
            raise UserError(f"query gradients have {queries.shape[1]} dims, the index has {store.dim}")
        self._fit_preconditioner(store, queries)
        q = self.transform(queries.float())
        self.q = q.mean(0, keepdim=True) if aggregate else q
        return self

    def _fit_preconditioner(self, store: GradientStore, queries: torch.Tensor) -> None:
        """Fit what depends on the stored rows and the queries (dot and cosine need nothing)."""

    def score(self, rows: torch.Tensor) -> torch.Tensor:
        """Scores [b, q] of stored rows [b, dim] against the fitted queries."""
        return self.transform(rows) @ self.q.T


class CosineScorer(Scorer):
    """Cosine similarity of gradients (unit-normalised dot product)."""

    name = "cosine"
    normalize = True

    def score(self, rows: torch.Tensor) -> torch.Tensor:
        # Divide the dot products by the row norms rather than normalising a copy of the block.
        return (rows @ self.q.T) / rows.norm(dim=1, keepdim=True).clamp_min(EPS)


class TrackStarScorer(Scorer):
    """TrackStar: cosine after the damped R^{-1/2} preconditioner on both sides.

    R mixes a training sample's autocorrelation (`fit_rows` rows drawn from the store) with the
    queries' (`mix="auto"`: eigenvalue matching at index `k`). Blocks are the tracked modules.
    """

    name = "trackstar"
    normalize = True

    def __init__(self, mix: float | str = "auto", damping: float = 0.1, fit_rows: int = 8192, k: int = 1000, seed: int = 0):
        super().__init__()
        self.mix, self.damping, self.fit_rows, self.k, self.seed = mix, damping, fit_rows, k, seed
        self.preconditioner: BlockPreconditioner | None = None

    def _fit_preconditioner(self, store: GradientStore, queries: torch.Tensor) -> None:
        blocks = [(s["start"], s["stop"]) for s in store.manifest["segments"]]
        train = store.sample(self.fit_rows, seed=self.seed)
        self.preconditioner = trackstar_preconditioner(train, queries.float(), blocks, self.mix, self.damping, self.k)

    def transform(self, rows: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.preconditioner.apply(rows), dim=1, eps=EPS)


SCORERS = {"dot": Scorer, "cosine": CosineScorer, "trackstar": TrackStarScorer}


def make_scorer(method: str, **options) -> Scorer:
    """A scorer by name: dot, cosine or trackstar (options go to its constructor)."""
    if method not in SCORERS:
        raise UserError(f"unknown method {method!r}; choose one of {', '.join(SCORERS)} (or tracin with several indexes)")
    return SCORERS[method](**options)
