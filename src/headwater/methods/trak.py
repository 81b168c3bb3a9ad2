"""TRAK (arXiv 2303.14186): attribution through a kernel of projected output gradients.

Per model m: Φ_m [n, k] are projected gradients of the output function f (classification
margin; for language models log p/(1-p) of the target tokens) on the training examples, φ_m [q, k]
those of the queries. The kernel score is φ_m (Φ_mᵀΦ_m + λI)⁻¹ Φ_mᵀ. Over an ensemble the kernel
scores are averaged, the reweighting Q_i = 1 − p_i (p_i the model's probability of training
example i's target) is averaged separately, and the two are multiplied. Positive = the training
example raises the query's output (helps). Independently trained models help far more than
checkpoints of one run.
"""

from __future__ import annotations

import numpy as np
import torch

from ..collect import GradientCollector
from ..data import as_records
from ..errors import UserError
from ..projection import ProjectionConfig
from ..task import Task, collated_batches, encode_records


def _rows(collector: GradientCollector, task: Task, records, fn, batch_size: int) -> torch.Tensor:
    return torch.cat([collector(b, fn) for b in collated_batches(task, encode_records(task, records), batch_size)]).double()


def _losses(model, task: Task, records, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([task.per_example_loss(model, b) for b in collated_batches(task, encode_records(task, records), batch_size)]).double()


def trak_scores(
    models: list[torch.nn.Module],
    task: Task,
    train_records,
    queries,
    projection: ProjectionConfig = ProjectionConfig("factored", 1024),
    damping: float = 1.0,
    modules: list[str] | None = None,
    batch_size: int = 16,
) -> np.ndarray:
    """TRAK scores [n_train, q] of an ensemble of models (one model: TRAK with M = 1).

    `damping` λ is a multiple of the mean eigenvalue of ΦᵀΦ (a ridge on the kernel). The default
    1.0 is deliberately strong: on benchmarks/lds.py's tabular task LDS rose monotonically from
    0.05 (λ = 1e-3) to 0.71 (λ = 1) for one model, because the kernel of a small training set is
    ill-conditioned and nearly interpolates when k is close to or above n.
    """
    if not hasattr(task, "per_example_output"):
        raise UserError(f"{type(task).__name__} has no output function for TRAK")
    train, query = as_records(train_records), as_records(queries)
    kernel_scores, reweight = 0.0, 0.0
    for model in models:
        collector = GradientCollector(model, task, projection, modules)
        phi_train = _rows(collector, task, train, task.per_example_output, batch_size)  # [n, k]
        phi_query = _rows(collector, task, query, task.per_example_output, batch_size)  # [q, k]
        n, k = phi_train.shape
        lam = damping * float((phi_train**2).sum() / k / n) * n
        if n >= k:  # primal: (ΦᵀΦ + λI)⁻¹ is k × k
            xtx = phi_train.T @ phi_train + lam * torch.eye(k, dtype=torch.float64)
            s = phi_query @ torch.linalg.solve(xtx, phi_train.T)
        else:  # dual (push-through identity): Φᵀ(ΦΦᵀ + λI)⁻¹ is n × n
            gram = phi_train @ phi_train.T + lam * torch.eye(n, dtype=torch.float64)
            s = phi_query @ phi_train.T @ torch.linalg.inv(gram)
        kernel_scores = kernel_scores + s.T / len(models)  # [n, q]
        reweight = reweight + (1 - torch.exp(-_losses(model, task, train, batch_size))) / len(models)
    return (kernel_scores * reweight[:, None]).numpy()
