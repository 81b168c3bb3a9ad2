"""Curvature-vector products of a step's batch loss: the Hessian H, or the Gauss–Newton matrix
G = Jᵀ H_z J (J the Jacobian of the model's outputs z, H_z the loss's Hessian in z).

Why Gauss–Newton by default: a step's linearised update is δθ ← (I − η C) δθ. Away from a
minimum the Hessian has negative directions, and holding one checkpoint's H for a whole later
stage compounds them into growth, (1 + η|λ|)ⁿ, that the real run (which moves past that
curvature) never shows. G is positive semi-definite, so the linearised steps contract whenever
ηλ < 2, as training itself does. For squared error on a linear model G = H exactly.

G is known for the tasks whose outputs and loss headwater owns (language models and ModuleTask's
cross-entropy and squared error); a task with its own loss function falls back to H.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..task import LanguageModelTask, ModuleTask, Task

OutputCurvature = tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


def softmax_curvature(logits: torch.Tensor, weight: torch.Tensor, normaliser: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """u ↦ H_z u for softmax cross-entropy weighted by weight/normaliser: w·(p ⊙ u − p (pᵀu)),
    logits [..., C], weight [...]."""
    p = logits.detach().softmax(-1)
    w = weight[..., None].to(p.dtype) / normaliser  # in the logits' precision: a float32 1/n is off by 1e-8
    return lambda u: w * (p * u - p * (p * u).sum(-1, keepdim=True))


def output_curvature(task: Task, model: torch.nn.Module, batch: dict, normaliser: float) -> OutputCurvature | None:
    """The outputs z of the batch and u ↦ H_z u of its loss divided by `normaliser`; None when the
    task's loss is its own function (no Gauss–Newton form known)."""
    if isinstance(task, LanguageModelTask):
        logits = task._logits(model, batch)
        return logits, softmax_curvature(logits, batch["target_mask"][:, 1:], normaliser)
    if isinstance(task, ModuleTask) and isinstance(task.loss_fn, str):
        out = task.outputs(model, batch)
        if task.loss_fn == "cross_entropy":
            return out, softmax_curvature(out, torch.ones(out.shape[:-1]), normaliser)
        return out, lambda u: 2 * u / normaliser
    return None


def curvature_products(task: Task, loss: Callable, outputs: Callable, theta: torch.Tensor, vectors: torch.Tensor, matrix: str) -> torch.Tensor:
    """C V, [B, P] for vectors V [B, P] at parameters θ [P]: C the batch loss's Hessian
    (`matrix="hessian"`, or when no Gauss–Newton form is known) or its Gauss–Newton matrix.

    `loss(θ)` is the scalar batch loss; `outputs(θ)` returns `output_curvature`'s pair or None."""
    theta = theta.clone().requires_grad_(True)
    with torch.enable_grad():
        pair = outputs(theta) if matrix == "gauss-newton" else None
        if pair is None:
            (g,) = torch.autograd.grad(loss(theta), theta, create_graph=True)
            return torch.stack([torch.autograd.grad(g, theta, v, retain_graph=True)[0] for v in vectors]).detach()
        z, h_z = pair
        # J v by the double-backward trick: Jᵀu is linear in u, so ∂(Jᵀu · v)/∂u = J v.
        u = torch.zeros_like(z, requires_grad=True)
        (jt_u,) = torch.autograd.grad(z, theta, u, create_graph=True)
        out = []
        for v in vectors:
            (jv,) = torch.autograd.grad(jt_u, u, v.to(jt_u.dtype), retain_graph=True)
            out.append(torch.autograd.grad(z, theta, h_z(jv), retain_graph=True)[0])
        return torch.stack(out).detach()
