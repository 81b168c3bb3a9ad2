"""Influence functions: score(z, q) = ∇L(q)ᵀ (G + λI)⁻¹ ∇L(z) (arXiv 2308.03296).

Up-weighting training example z by ε moves the parameters by −ε (G+λI)⁻¹∇L(z) and the query
loss by −ε ∇L(q)ᵀ(G+λI)⁻¹∇L(z); the library's sign (positive = helps = lowers the query loss)
is therefore +∇L(q)ᵀ(G+λI)⁻¹∇L(z).

G is KFAC or EK-FAC (`curvature.Curvature`), optionally refined by preconditioned conjugate
gradient on the full damped Fisher of the fitting sample, or dense (`DenseCurvature`, exact
Gauss–Newton, for tiny models and tests). Query gradients are preconditioned once; training
examples are then scored either by streaming over the data (exact; queries optionally compressed
to rank r) or against an index's stored projected gradients (queries projected the same way).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..collect import GradientCollector
from ..curvature import Curvature, _batches, _loss_fn
from ..data import as_records
from ..errors import UserError
from ..projection import ProjectionConfig, project
from ..task import Task, collated_batches, encode_records

Grads = dict[str, torch.Tensor]  # module name -> [q, d_out, d_in_aug]


def full_gradients(collector: GradientCollector, batches, loss_fns=None) -> Grads:
    """Per-example full gradients {module: [n, d_out, d_in_aug]} (small models, queries)."""
    rows = torch.cat([collector(b, loss_fns[i] if loss_fns else None) for i, b in enumerate(batches)])
    return split_rows(collector, rows)


def loss_gradients(collector: GradientCollector, records, batch_size: int = 16) -> Grads:
    """∇L of each record's example under the collector's model, {module: [n, d_out, d_in_aug]}."""
    records, task = as_records(records), collector.task
    return full_gradients(collector, list(collated_batches(task, encode_records(task, records), batch_size)))


def split_rows(collector: GradientCollector, rows: torch.Tensor) -> Grads:
    return {n: rows[:, a:b].reshape(len(rows), tm.d_out, tm.d_in_aug) for (n, (a, b)), tm in zip(collector.segments.items(), collector.modules.values())}


def _dot(x: Grads, y: Grads) -> torch.Tensor:
    """Per-query inner products [q] of two gradient dicts."""
    return sum((x[n] * y[n]).flatten(1).sum(1) for n in x)


def low_rank(h: Grads, rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Rank-r factors (U S [q, d_out, r], V [q, d_in_aug, r]) of each query direction."""
    out = {}
    for name, m in h.items():
        u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
        r = min(rank, s.shape[1])
        out[name] = (u[:, :, :r] * s[:, None, :r], vh[:, :r, :].transpose(1, 2))
    return out


def stream_scores(collector: GradientCollector, task: Task, records, h: Grads, rank: int | None = None, batch_size: int = 16, progress: bool = False) -> np.ndarray:
    """<h_q, ∇L(z)> for every training example z and query direction q, [n, q], without forming
    ∇L(z): Σ_t δ_tᵀ h a_t per module (or, with `rank`, Σ_t (δ_tᵀU)(Vᵀa_t) with h ≈ U Vᵀ)."""
    factors = low_rank(h, rank) if rank else None
    records = as_records(records)
    examples = encode_records(task, records)
    out = []
    for batch in tqdm(collated_batches(task, examples, batch_size), total=-(-len(examples) // batch_size), desc="scores", disable=not progress):
        _, calls = collector.module_grads(batch)
        s = 0
        for tm, a, delta in calls:
            a_aug = tm.augment(a)
            if factors is None:
                s = s + torch.einsum("bto,qoi,bti->bq", delta, h[tm.name].to(delta.dtype), a_aug)
            else:
                u, v = (f.to(delta.dtype) for f in factors[tm.name])
                s = s + torch.einsum("btqr,btqr->bq", torch.einsum("bto,qor->btqr", delta, u), torch.einsum("bti,qir->btqr", a_aug, v))
        out.append(s.detach())
    return torch.cat(out).numpy()


@dataclass
class DenseCurvature:
    """The exact Gauss–Newton matrix over the tracked parameters, [P, P] (tiny models only).

    For cross-entropy the GN equals the Fisher with the expectation over every class taken
    exactly: G = (1/N) Σ_n Σ_c p_c(x_n) g_{n,c} g_{n,c}ᵀ with g_{n,c} the gradient of −log p_c.
    """

    matrix: torch.Tensor
    shapes: dict[str, tuple[int, int]]
    damping: float = 0.0

    def inverse_hvp(self, grads: Grads, ekfac: bool = True, damping: float | None = None) -> Grads:
        lam = self.damping if damping is None else damping
        flat = torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], 1).double()
        eye = torch.eye(self.matrix.shape[0], dtype=torch.float64)
        sol = torch.linalg.solve(self.matrix + lam * eye, flat.T).T
        out, start = {}, 0
        for n, (o, i) in self.shapes.items():
            out[n] = sol[:, start : start + o * i].reshape(-1, o, i).to(grads[n].dtype)
            start += o * i
        return out


def dense_gauss_newton(model: torch.nn.Module, task: Task, records, modules: list[str] | None = None, num_classes: int | None = None, damping: float = 0.0) -> DenseCurvature:
    """Exact GN of a classifier's mean cross-entropy over `records` for the tracked modules."""
    collector = GradientCollector(model, task, ProjectionConfig("none"), modules)
    batch = task.collate(encode_records(task, records))
    with torch.no_grad():
        probs = model(batch["x"]).double().softmax(-1)
    C = num_classes or probs.shape[1]
    G = torch.zeros(collector.dim, collector.dim, dtype=torch.float64)
    for c in range(C):
        labelled = {**batch, "y": torch.full_like(batch["y"], c)}
        g = collector(labelled).double()
        G += (g * probs[:, c : c + 1]).T @ g
    shapes = {n: (tm.d_out, tm.d_in_aug) for n, tm in collector.modules.items()}
    return DenseCurvature(G / len(batch["y"]), shapes, damping)


class InfluenceFunction:
    """Influence of training examples on queries under a curvature approximation.

        inf = InfluenceFunction(model, task, curvature)              # EK-FAC
        scores = inf.scores(train_records, queries)                  # [n_train, q], exact streaming
        rows = inf.query_rows(queries, index)                        # for Index-stored gradients

    `ekfac=False` uses KFAC eigenvalues; `cg_steps` refines (G+λI)⁻¹∇L(q) by preconditioned CG
    on the Fisher of `cg_records` (default: the curvature's own fitting records, sampled labels
    regenerated with the same seeds); `rank` compresses each preconditioned query gradient to
    rank r per module before streaming.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        task: Task,
        curvature: Curvature | DenseCurvature,
        modules: list[str] | None = None,
        ekfac: bool = True,
        damping: float | None = None,
        cg_steps: int = 0,
        cg_records=None,
        rank: int | None = None,
        batch_size: int = 16,
    ):
        self.model, self.task, self.curvature = model, task, curvature
        names = modules or list(curvature.modules if isinstance(curvature, Curvature) else curvature.shapes)
        self.collector = GradientCollector(model, task, ProjectionConfig("none"), names)
        self.ekfac, self.damping, self.cg_steps, self.cg_records = ekfac, damping, cg_steps, cg_records
        self.rank, self.batch_size = rank, batch_size
        if cg_steps and not isinstance(curvature, Curvature):
            raise UserError("CG refinement needs KFAC/EK-FAC factors")
        if cg_steps and cg_records is None:
            raise UserError("CG refinement needs the records to take Fisher-vector products on (cg_records=)")

    # ------------------------------------------------------------------ the query side

    def query_gradients(self, queries) -> Grads:
        """∇L(q) per module, [q, d_out, d_in_aug]."""
        return loss_gradients(self.collector, queries, self.batch_size)

    def precondition(self, grads: Grads) -> Grads:
        """(G + λI)⁻¹ g per query, refined by `cg_steps` of preconditioned CG when asked."""
        x = self.curvature.inverse_hvp(grads, self.ekfac, self.damping)
        if self.cg_steps:
            x = self._cg(grads, x)
        return x

    def _damping(self, name: str) -> float:
        return self.curvature.damping_for(name, True, self.damping)

    def fisher_vector_product(self, v: Grads) -> Grads:
        """(F + λI) v with F the Fisher of the CG records (same label samples as the factors)."""
        config = self.curvature.config
        batches = _batches(self.task, self.cg_records, config)
        out = {n: torch.zeros_like(t) for n, t in v.items()}
        n_examples = 0
        for i, batch in enumerate(batches):
            losses, calls = self.collector.module_grads(batch, _loss_fn(self.task, config, i))
            n_examples += losses.shape[0]
            per_module: dict[str, tuple[list, list]] = {}
            for tm, a, delta in calls:
                a_aug = tm.augment(a)
                per_module.setdefault(tm.name, ([], []))[0].append(a_aug)
                per_module[tm.name][1].append(delta)
            # g_nᵀ v for every example n and query: Σ_modules Σ_calls Σ_t δᵀ V a
            coef = sum(  # float64: CG needs more precision than the float32 activations carry
                torch.einsum("bto,qoi,bti->bq", d.double(), v[name].double(), a.double())
                for name, (acts, deltas) in per_module.items() for a, d in zip(acts, deltas)
            )
            for name, (acts, deltas) in per_module.items():
                for a, d in zip(acts, deltas):
                    out[name] += torch.einsum("bq,bto,bti->qoi", coef, d.double(), a.double()).to(out[name].dtype)
        return {n: out[n] / n_examples + self._damping(n) * v[n] for n in v}

    def _cg(self, b: Grads, x: Grads) -> Grads:
        ax = self.fisher_vector_product(x)
        r = {n: b[n] - ax[n] for n in b}
        z = self.curvature.inverse_hvp(r, self.ekfac, self.damping)
        p = {n: z[n].clone() for n in z}
        rz = _dot(r, z)
        for _ in range(self.cg_steps):
            ap = self.fisher_vector_product(p)
            alpha = rz / _dot(p, ap).clamp_min(1e-30)
            x = {n: x[n] + alpha.view(-1, 1, 1) * p[n] for n in x}
            r = {n: r[n] - alpha.view(-1, 1, 1) * ap[n] for n in r}
            z = self.curvature.inverse_hvp(r, self.ekfac, self.damping)
            rz_new = _dot(r, z)
            beta = rz_new / rz.clamp_min(1e-30)
            p = {n: z[n] + beta.view(-1, 1, 1) * p[n] for n in p}
            rz = rz_new
        return x

    # ------------------------------------------------------------------ the training side

    def scores(self, train_records, queries, progress: bool = False) -> np.ndarray:
        """Exact influence scores [n_train examples, q], streaming over the training data."""
        h = self.precondition(self.query_gradients(queries))
        return stream_scores(self.collector, self.task, train_records, h, self.rank, self.batch_size, progress)

    def query_rows(self, queries, index) -> torch.Tensor:
        """Preconditioned query gradients projected into `index`'s space, [q, dim]: their dot
        products with the stored rows are the influence scores (up to projection noise)."""
        built = index.manifest
        if built["normalizer"]:
            raise UserError("influence scores need an index built without --optimizer-state")
        names = [m["name"] for m in built["modules"]]
        if names != list(self.collector.modules):
            raise UserError(f"modules mismatch: the index tracks {names}, the influence function {list(self.collector.modules)}")
        cfg = ProjectionConfig(**built["projection"])
        h = self.precondition(self.query_gradients(queries))
        return torch.cat([project(cfg, n, h[n].float()) for n in names], 1)
