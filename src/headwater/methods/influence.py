"""Influence functions: score(z, q) = ∇f(q)ᵀ (G + λI)⁻¹ ∇L(z) (arXiv 2308.03296).

Up-weighting training example z by ε moves the parameters by −ε (G+λI)⁻¹∇L(z) and the query's
objective (the measurement turned into something to lower) by −ε ∇f(q)ᵀ(G+λI)⁻¹∇L(z), so the
library's sign (positive = moves the measurement in its direction) is +∇f(q)ᵀ(G+λI)⁻¹∇L(z).

G is KFAC or EK-FAC (`curvature.Curvature`), optionally refined by preconditioned conjugate
gradient on the full Fisher of the training records, or dense (`DenseCurvature`, the exact
Gauss–Newton of a small classifier). Query gradients are preconditioned once; training examples
are then scored by streaming over the data (exact; queries optionally compressed to rank r) or
against an index's stored projected gradients (queries projected the same way).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..collect import GradientCollector
from ..config import CurvatureConfig, InfluenceConfig, ProjectionConfig
from ..curvature import Curvature, curvature_batches, draw_weights, fisher_draws, fit_curvature
from ..errors import UserError
from ..index import Index
from ..measurement import Measurement, objective_fn
from ..projection import project
from ..scores import Scores
from ..task import ModuleTask, Task, collated_batches, is_classifier, whole_examples
from .base import Blocks, Method, query_records, training_data

Grads = dict[str, torch.Tensor]  # module name -> [q, d_out, d_in_aug]


def split_rows(collector: GradientCollector, rows: torch.Tensor) -> Grads:
    """Unprojected rows [n, dim] as per-module gradient matrices."""
    return {
        n: rows[:, a:b].reshape(len(rows), tm.d_out, tm.d_in_aug) for (n, (a, b)), tm in zip(collector.segments.items(), collector.modules.values())
    }


def record_gradients(collector: GradientCollector, records, measurement: Measurement | None = None, batch_size: int = 8) -> Grads:
    """Per-record full gradients {module: [n, d_out, d_in_aug]} of the training loss, or of
    `measurement`'s objective (all of a record's targets together)."""
    task = collector.task
    fn = objective_fn(measurement, task) if measurement is not None else None
    batches = collated_batches(task, whole_examples(task, records), batch_size)
    return split_rows(collector, torch.cat([collector(b, fn) for b in batches]))


def dot(x: Grads, y: Grads) -> torch.Tensor:
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


def stream_scores(
    collector: GradientCollector, records, h: Grads, rank: int | None = None, batch_size: int = 8, progress: bool = False, by_module: bool = False
) -> Blocks:
    """<h_q, ∇L(z)> for every training example z (one per attribution unit) and query direction q,
    streamed as blocks, without forming ∇L(z): Σ_t δ_tᵀ h a_t per module (or, with `rank`,
    Σ_t (δ_tᵀU)(Vᵀa_t) with h ≈ U Vᵀ). `by_module` keeps the modules' terms apart, [k, b, q]."""
    task = collector.task
    if task.unit == "token":
        raise UserError("exact streaming influence has one row per document or sentence; for token rows build an index")
    factors = low_rank(h, rank) if rank else None
    items = [(r, u, ex) for r in range(len(records)) for u, ex in enumerate(task.encode(records[r]))]
    start = 0
    for lo in tqdm(range(0, len(items), batch_size), desc="scores", disable=not progress):
        chunk = items[lo : lo + batch_size]
        _, calls = collector.module_grads(task.collate([ex for _, _, ex in chunk]))
        terms = dict.fromkeys(h, 0)
        for tm, a, delta in calls:
            a_aug = tm.augment(a)
            if factors is None:
                terms[tm.name] = terms[tm.name] + torch.einsum("bto,qoi,bti->bq", delta, h[tm.name].to(delta.dtype), a_aug)
            else:
                u, v = (f.to(delta.dtype) for f in factors[tm.name])
                term = torch.einsum("btqr,btqr->bq", torch.einsum("bto,qor->btqr", delta, u), torch.einsum("bti,qir->btqr", a_aug, v))
                terms[tm.name] = terms[tm.name] + term
        ids = np.array([(r, u) for r, u, _ in chunk], dtype=np.int64)
        parts = [t.detach() if torch.is_tensor(t) else torch.zeros(len(chunk), next(iter(h.values())).shape[0]) for t in terms.values()]
        yield start, ids, torch.stack(parts) if by_module else sum(parts)
        start += len(chunk)


@dataclass
class DenseCurvature:
    """The exact Gauss–Newton matrix over the tracked parameters, [P, P] (tiny models only).

    For cross-entropy the GN equals the Fisher with the expectation over every class taken
    exactly: G = (1/N) Σ_n Σ_c p_c(x_n) g_{n,c} g_{n,c}ᵀ with g_{n,c} the gradient of −log p_c.
    """

    matrix: torch.Tensor
    shapes: dict[str, tuple[int, int]]

    @property
    def modules(self) -> dict[str, tuple[int, int]]:
        return self.shapes

    def inverse_hvp(self, grads: Grads, damping: float, mode: str = "relative", ekfac: bool = True) -> Grads:
        # one matrix, one λ: relative and model damping are both a fraction of its mean eigenvalue
        lam = damping if mode == "absolute" else damping * float(self.matrix.diagonal().mean())
        flat = torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], 1).double()
        eye = torch.eye(self.matrix.shape[0], dtype=torch.float64)
        sol = torch.linalg.solve(self.matrix + lam * eye, flat.T).T
        out, start = {}, 0
        for n, (o, i) in self.shapes.items():
            out[n] = sol[:, start : start + o * i].reshape(-1, o, i)
            start += o * i
        return out


def dense_gauss_newton(model: torch.nn.Module, task: ModuleTask, records, modules: list[str] | None = None) -> DenseCurvature:
    """Exact GN of a classifier's mean cross-entropy over `records` for the tracked modules."""
    if not is_classifier(task):
        raise UserError("the dense Gauss–Newton is for ModuleTask classifiers (loss_fn='cross_entropy')")
    collector = GradientCollector(model, task, ProjectionConfig("none"), modules)
    batch = task.collate(whole_examples(task, records))
    with torch.no_grad():
        probs = task.outputs(model, batch).double().softmax(-1)
    G = torch.zeros(collector.dim, collector.dim, dtype=torch.float64)
    for c in range(probs.shape[1]):
        g = collector({**batch, task.target_key: torch.full_like(batch[task.target_key], c)}).double()
        G += (g * probs[:, c : c + 1]).T @ g
    shapes = {n: (tm.d_out, tm.d_in_aug) for n, tm in collector.modules.items()}
    return DenseCurvature(G / len(probs), shapes)


def curvature_file(index: Index, config: CurvatureConfig) -> Path:
    """Where an index keeps curvature fitted with these settings (one file per settings)."""
    key = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    return index.path / f"curvature-{key}.safetensors"


class InfluenceFunction(Method):
    """EK-FAC (or KFAC) influence of training records on queries.

        scores = EKFAC(model, task).fit(train_records).score(queries)          # exact streaming
        scores = EKFAC().fit(index).score(queries, measurement=LogOdds())      # via stored rows

    `fit` fits the curvature on the training records (with an index: once, saved beside it),
    unless `curvature=` is given. `config.cg_steps` refines (G+λI)⁻¹∇f by preconditioned CG on the
    Fisher of the training records; `config.query_rank` compresses preconditioned queries.
    """

    name = "ekfac"
    ekfac = True
    config_class = InfluenceConfig
    breakdowns = ("module",)

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        task: Task | None = None,
        config: InfluenceConfig | None = None,
        curvature: Curvature | DenseCurvature | None = None,
    ):
        self.model, self.task, self.curvature = model, task, curvature
        self.config = config or InfluenceConfig()

    def fit(self, train, progress: bool = False) -> InfluenceFunction:
        self.data = training_data(train)
        index = self.data.index
        if index is not None:
            if index.manifest["normalizer"]:
                raise UserError("influence scores need an index built without --optimizer-state")
            self.model = self.model if self.model is not None else index.model()
            self.task = self.task if self.task is not None else index.task()
            index.collector(self.model, self.task)  # refuses a model that differs from the index's
            names = index.module_names
        elif self.model is None or self.task is None:
            raise UserError(f"{type(self).__name__} without an index needs model= and task=")
        else:
            names = list(self.curvature.modules) if self.curvature is not None else self.config.modules
        self.collector = GradientCollector(self.model, self.task, ProjectionConfig("none"), names)
        if self.config.cg_steps and isinstance(self.curvature, DenseCurvature):
            raise UserError("CG refinement needs KFAC/EK-FAC factors")
        if self.curvature is None:
            self.curvature = self._fitted_curvature(index, progress)
        return self

    def _fitted_curvature(self, index: Index | None, progress: bool) -> Curvature:
        config = self.config.solve_curvature(self.task)
        path = curvature_file(index, config) if index is not None else None
        if path is not None and path.exists():
            return Curvature.load(path)
        # KFAC skips EK-FAC's correction pass, unless the curvature is saved beside an index for both
        ekfac = self.ekfac or path is not None
        curv = fit_curvature(self.model, self.task, self.data.records, list(self.collector.modules), config, ekfac, progress)
        if path is not None:
            curv.save(path)
        return curv

    # ------------------------------------------------------------------ the query side

    def preconditioned_queries(self, queries, measurement: Measurement) -> Grads:
        """(G + λI)⁻¹ ∇f(q) per query and module, refined by CG when asked."""
        records, _ = query_records(queries)
        grads = record_gradients(self.collector, records, measurement, self.config.batch_size)
        x = self._inverse(grads)
        if self.config.cg_steps:
            x = self._cg(grads, x)
        return x

    def config_used(self) -> dict:
        damping, mode = self._solve_damping()
        used = dataclasses.replace(self.config, damping=damping, damping_mode=mode)
        if isinstance(self.curvature, Curvature):
            used = dataclasses.replace(used, curvature=self.curvature.config)
        return used.to_dict()

    def _inverse(self, grads: Grads) -> Grads:
        return self.curvature.inverse_hvp(grads, *self._solve_damping(), self.ekfac)

    def _damping(self, name: str) -> float:
        return self.curvature.damping_for(name, *self._solve_damping(), self.ekfac)

    def _solve_damping(self) -> tuple[float, str]:
        fisher = self.curvature.config.fisher if isinstance(self.curvature, Curvature) else None
        return self.config.solve_damping(fisher)

    def fisher_vector_product(self, v: Grads) -> Grads:
        """(F + λI) v with F the Fisher of the training records the factors were fitted on (the
        same sampled labels, or every class weighted by its probability for fisher="exact")."""
        config = self.curvature.config
        out = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in v.items()}
        n_examples = 0
        for i, batch in enumerate(curvature_batches(self.task, self.fitted().records, config)):
            for j, (labelled, loss, weighted) in enumerate(fisher_draws(self.task, self.model, config, batch, i)):
                losses, calls = self.collector.module_grads(labelled, loss)
                n_examples += losses.shape[0] if j == 0 else 0
                w = draw_weights(losses, weighted)
                # g_nᵀ v for every example n and query: Σ_modules Σ_calls Σ_t δᵀ V a, in float64
                coef = sum(torch.einsum("bto,qoi,bti->bq", d.double(), v[tm.name].double(), tm.augment(a).double()) for tm, a, d in calls)
                coef = coef * w[:, None]
                for tm, a, d in calls:
                    out[tm.name] += torch.einsum("bq,bto,bti->qoi", coef, d.double(), tm.augment(a).double())
        return {n: out[n] / n_examples + self._damping(n) * v[n] for n in v}

    def _cg(self, b: Grads, x: Grads) -> Grads:
        ax = self.fisher_vector_product(x)
        r = {n: b[n] - ax[n] for n in b}
        z = self._inverse(r)
        p = {n: z[n].clone() for n in z}
        rz = dot(r, z)
        for _ in range(self.config.cg_steps):
            ap = self.fisher_vector_product(p)
            alpha = rz / dot(p, ap).clamp_min(1e-30)
            x = {n: x[n] + alpha.view(-1, 1, 1) * p[n] for n in x}
            r = {n: r[n] - alpha.view(-1, 1, 1) * ap[n] for n in r}
            z = self._inverse(r)
            rz_new = dot(r, z)
            beta = rz_new / rz.clamp_min(1e-30)
            p = {n: z[n] + beta.view(-1, 1, 1) * p[n] for n in p}
            rz = rz_new
        return x

    # ------------------------------------------------------------------ the training side

    def labels(self, by: str) -> list:
        return list(self.collector.modules)

    def score_blocks(self, queries, measurement: Measurement, by: str | None = None) -> Blocks:
        return self.solution_blocks(self.preconditioned_queries(queries, measurement), by)

    def score_solution(self, queries, solution: Grads, measurement: Measurement | None = None) -> Scores:
        """Scores [n_train records, q] of a query-side solve computed elsewhere (CG on another
        curvature, an exact inverse): `solution[module]` [q, d_out, d_in(+1)] takes the place of
        (G + λI)⁻¹ ∇f(q); `queries` only name the columns."""
        measurement = measurement or self.default_measurement()
        return self.scores_of_blocks(self.solution_blocks({n: t.float() for n, t in solution.items()}), query_records(queries)[1], measurement)

    def solution_blocks(self, h: Grads, by: str | None = None) -> Blocks:
        data = self.fitted()
        index = data.index
        if index is None:
            yield from stream_scores(self.collector, data.records, h, self.config.query_rank, self.config.batch_size, by_module=by == "module")
            return
        cfg = index.projection
        rows = torch.cat([project(cfg, n, h[n].float()) for n in index.module_names], 1)
        for block in index.store.blocks(reuse=True):
            if by is None:
                yield block.start, block.ids, block.rows @ rows.T
            else:
                yield block.start, block.ids, torch.stack([block.rows[:, a:b] @ rows[:, a:b].T for _, a, b in index.store.segments])


class EKFAC(InfluenceFunction):
    """Influence functions with the eigenvalue-corrected Kronecker-factored curvature."""

    name = "ekfac"
    ekfac = True


class KFAC(InfluenceFunction):
    """Influence functions with the Kronecker-factored curvature (eigenvalues λ_S λ_A)."""

    name = "kfac"
    ekfac = False
