"""Where the later steps' curvature comes from, for the stage estimators (`StageAttribution`
inherits `LaterCurvature`):

- per step, a curvature-vector product of the step's batch (its recorded records, or a sample of
  the stage's) at the run's parameters for that step (`_hvp`), saved, interpolated between saved
  parameters, or replayed (`_path_point`);
- per stage, at scale, an EK-FAC eigenbasis (`_eigenbases`, `eigenbasis.py`) made exact on the
  span of given vectors by Gauss–Newton products at the stage's middle step (`_corrected`).

The mixin reads the attribution's trajectory, model, task, config, data, curvatures, space and
`_bound`, and keeps its caches (`_init_curvature`).
"""

from __future__ import annotations

import bisect

import numpy as np
import torch
from tqdm.auto import tqdm

from ..collect import tracked_modules
from ..curvature import fit_curvature
from ..data import id_positions, record_ids
from ..errors import UserError
from ..normalizer import floored
from ..task import LanguageModelTask, Task, TokenExample, batch_normaliser, collated_batches, whole_examples
from ..training import twice_differentiable_attention
from .eigenbasis import StageEigenbasis
from .gauss_newton import curvature_products, output_curvature
from .propagation import AdamStep
from .replay import StageReplay


class LaterCurvature:
    """The curvature of a recorded run's steps, per step or per stage (a mixin of `StageAttribution`)."""

    def _init_curvature(self) -> None:
        self._saved: dict[int, torch.Tensor] = {}  # flattened parameters before a step, as loaded or replayed
        self._replay_tried: set[int] = set()  # curvature_path="replayed": stages replayed, or tried
        self._interpolated: list[str] = []  # the stages that could not be replayed, and why
        self._positions: dict[str, dict[str, int]] = {}  # stage -> record id -> position in its data
        self._adam_steps: dict[int, AdamStep] = {}  # curvature_path="replayed": each replayed Adam step's own moments
        self._bases: dict[int, StageEigenbasis | None] = {}  # curvature_matrix="ekfac": per stage, None with neither records nor a fit
        # the steps whose starting parameters are saved: stage boundaries and checkpoints inside stages
        self._saved_steps = sorted({b for s in self.trajectory.stages for b in (s.start, s.stop)} | set(self.trajectory.checkpoint_steps))

    def _hvp(self, first_stage: int = 0, progress: bool = False):
        """(step, V [B, P]) -> C V, C the curvature (`config.curvature_matrix`) of the step's batch
        loss at the run's parameters for that step (`_path_point`), for steps of stage
        `first_stage` on."""
        stage_of = {t: k for k, s in enumerate(self.trajectory.stages) for t in range(s.start, s.stop)}
        twice_differentiable_attention(self.model)
        if self.config.curvature_path == "replayed":
            self._replay_path(first_stage, progress)

        def hvp(t: int, v: torch.Tensor) -> torch.Tensor:
            batch = self._step_batch(t, stage_of[t])
            if batch is None:
                return torch.zeros_like(v)
            normaliser = batch_normaliser(batch, self.config.batch_loss)
            return curvature_products(
                self.task,
                lambda th: self.task.loss(self._bound(th), batch).sum() / normaliser,
                lambda th: output_curvature(self.task, self._bound(th), batch, normaliser),
                self._path_point(t),
                v,
                self.config.curvature_matrix,
            )

        return hvp

    def _eigenbases(self, first_stage: int, progress: bool = False) -> dict[int, StageEigenbasis | None]:
        """Each stage's EK-FAC eigenbasis from stage `first_stage` on: the fit given in `curvatures`,
        or one fitted on the stage's records, pooled over its start and end checkpoints (None for
        a stage with neither: it propagates to first order)."""
        if self.config.curvature_path == "replayed":  # the corrections' products at the replayed midpoints
            self._replay_path(first_stage, progress)
        for k, stage in enumerate(self.trajectory.stages):
            if k < first_stage or k in self._bases:
                continue
            curvature = self.curvatures.get(stage.name)
            if curvature is None and stage.name in self.data:
                models = [self.trajectory.checkpoint(stage.name, self.model, end) for end in (False, True)]
                curvature = fit_curvature(models, self.task, self.data[stage.name], self.config.modules, self.config.ekfac, progress=progress)
                self.curvatures[stage.name] = curvature
            if curvature is None:
                self._bases[k] = None
                continue
            scale = 1.0
            if self.config.batch_loss == "token-mean" and isinstance(self.task, LanguageModelTask):
                if stage.name not in self.data:
                    raise UserError(
                        f"stage {stage.name!r}'s EK-FAC fit is per example and the run's loss per target token: "
                        "give the stage's records too, for their targets per example"
                    )
                scale = 1 / targets_per_example(self.task, self.data[stage.name])
            self._bases[k] = StageEigenbasis(curvature, tracked_modules(self.model, list(curvature.modules)), self.space, scale)
        return self._bases

    def _replay_path(self, first_stage: int, progress: bool = False) -> None:
        """The starting parameters of every step of stage `first_stage` on, and each Adam step's
        own moments (`_adam_steps`), from replaying each stage over its recorded batches
        (`StageReplay`); a stage that cannot be replayed keeps the interpolated path."""
        for k, stage in enumerate(self.trajectory.stages):
            if k < first_stage or k in self._replay_tried:
                continue
            self._replay_tried.add(k)
            try:
                if stage.name not in self.data:
                    raise UserError("its records were not given")
                replay = StageReplay(self.trajectory, stage.name, self.model, self.task, self.data[stage.name], self.config.batch_loss)
            except UserError as exc:
                self._interpolated.append(f"{stage.name} ({exc})")
                continue
            s, ones = replay.initial_state(), replay.ones()
            for t in tqdm(range(stage.stop - stage.start), desc=f"replaying {stage.name}", disable=not progress):
                self._saved.setdefault(stage.start + t, self.space.flatten({n: s[f"p.{n}"] for n in replay.names}))
                after = replay.step(s, t, replay.weights_for(ones, t))
                if replay.config.optimizer == "adamw":
                    self._adam_steps[stage.start + t] = self._adam_step(replay, t, s, after)
                s = after
        self._saved_steps = sorted(set(self._saved_steps) | set(self._saved))

    def _adam_step(self, replay: StageReplay, t: int, before: dict, after: dict) -> AdamStep:
        """Replayed Adam step t's coefficients (`AdamStep`), from the moments before and after it;
        each tensor's v̂ floored as the stage preconditioners' are (`normalizer.floored`)."""
        cfg, count = replay.config, replay.counts[t]
        b1, b2 = 1 - cfg.beta1**count, 1 - cfg.beta2**count
        parts: dict[str, dict[str, torch.Tensor]] = {"precondition": {}, "response": {}, "gradient": {}}
        for n in replay.names:
            m, v = after[f"m.{n}"].double(), after[f"v.{n}"].double()
            g = (m - cfg.beta1 * before[f"m.{n}"].double()) / (1 - cfg.beta1)  # the (clipped) gradient the step took
            root = floored(v / b2).sqrt()
            denom = root + cfg.adam_eps
            parts["precondition"][n] = 1 / denom
            parts["response"][n] = torch.where(root > 0, (m / b1) / (2 * root.clamp_min(1e-300) * denom**2 * b2), torch.zeros_like(m))
            parts["gradient"][n] = 2 * (1 - cfg.beta2) * g
        return AdamStep(**{k: self.space.flatten(v) for k, v in parts.items()}, beta2=cfg.beta2)

    def _path_point(self, t: int) -> torch.Tensor:
        """θ_t [P], the parameters step t started from: replayed (`curvature_path="replayed"`), or between the
        nearest saved parameters before and after it (stage boundaries, the recorder's
        `checkpoint_every` checkpoints), interpolated by the learning rate spent, as the run moves
        in proportion to it."""
        saved = self._saved_steps
        i = bisect.bisect_right(saved, t) - 1
        a, b = saved[i], saved[min(i + 1, len(saved) - 1)]
        if a == t or a == b:
            return self._saved_point(a)
        spent = [self.trajectory.steps[s].lr[0] * self.trajectory.steps[s].clip for s in range(a, b)]
        w = sum(spent[: t - a]) / sum(spent) if sum(spent) > 0 else (t - a) / (b - a)
        return (1 - w) * self._saved_point(a) + w * self._saved_point(b)

    def _saved_point(self, step: int) -> torch.Tensor:
        if step not in self._saved:
            self._saved[step] = self.space.flatten(self.trajectory.params_before(step))
        return self._saved[step]

    def _step_batch(self, t: int, k: int):
        """The records of step t (or a seeded sample of its stage's records when not recorded)."""
        stage = self.trajectory.stages[k]
        if stage.name not in self.data:
            return None
        records = self.data[stage.name]
        ids = self.trajectory.steps[t].ids
        if ids is not None:
            if stage.name not in self._positions:  # once per stage, not per curvature product
                self._positions[stage.name] = id_positions(self._ids(stage.name))
            position = self._positions[stage.name]
            chosen = [position[str(i)] for i in ids if str(i) in position]
        else:
            chosen = self._stage_sample(k)
        if not chosen:
            return None
        return self.task.collate([self.task.whole(records[i]) for i in chosen])

    def _stage_sample(self, k: int) -> list[int]:
        """Positions of a seeded sample of `hvp_examples` of stage k's records (the same every call)."""
        g = torch.Generator().manual_seed(self.config.sample_seed + k)
        return torch.randperm(len(self.data[self.trajectory.stages[k].name]), generator=g)[: self.config.hvp_examples].tolist()

    def _ids(self, stage: str) -> list:
        return record_ids(self.data[stage])

    def _corrected(self, j: int, basis: StageEigenbasis, vectors: torch.Tensor) -> StageEigenbasis:
        """Stage j's basis made exact on the span of `vectors` [B, P] and their Gauss–Newton
        products (as is, without the stage's records)."""
        vectors = vectors[torch.isfinite(vectors).all(1) & vectors.ne(0).any(1)]
        if self.trajectory.stages[j].name not in self.data or not len(vectors):
            return basis
        span = orthonormal(torch.cat([vectors, self._stage_products(j, vectors)]))
        return basis.corrected(span, self._stage_products(j, span))

    def _eigenbasis_adjoint(self, first_stage: int):
        """(hvp, on_boundary) for `adjoint` with each stage's eigenbasis from `first_stage` on,
        corrected on the span of the adjoint vectors entering it from the end of the run."""
        bases = {j: b for j, b in self._eigenbases(first_stage).items() if j >= first_stage}
        stage_of = {t: k for k, s in enumerate(self.trajectory.stages) for t in range(s.start, s.stop)}

        def on_boundary(j: int, a_theta: torch.Tensor, a_m: torch.Tensor) -> None:
            if bases.get(j) is not None:
                bases[j] = self._corrected(j, bases[j], torch.cat([a_theta, a_m]))

        def hvp(t: int, v: torch.Tensor) -> torch.Tensor:
            basis = bases.get(stage_of[t])
            return basis.products(v) if basis is not None else torch.zeros_like(v)

        return hvp, on_boundary

    def _stage_products(self, j: int, vectors: torch.Tensor) -> torch.Tensor:
        """C V [B, P] for V [B, P]: the Gauss–Newton matrix of stage j's batch loss at its middle
        step's parameters, on a seeded sample of `hvp_examples` of its records (its expected
        per-step curvature)."""
        twice_differentiable_attention(self.model)
        stage, records = self.trajectory.stages[j], self.data[self.trajectory.stages[j].name]
        batches = list(collated_batches(self.task, [self.task.whole(records[i]) for i in self._stage_sample(j)], self.config.batch_size))
        normaliser = sum(batch_normaliser(b, self.config.batch_loss) for b in batches)
        theta = self._path_point((stage.start + stage.stop - 1) // 2)
        return sum(
            curvature_products(
                self.task,
                lambda th, b=b: self.task.loss(self._bound(th), b).sum() / normaliser,
                lambda th, b=b: output_curvature(self.task, self._bound(th), b, normaliser),
                theta,
                vectors,
                "gauss-newton",
            )
            for b in batches
        )


def targets_per_example(task: Task, records) -> float:
    """The mean number of predicted targets per record (1 for a record that is one example)."""
    return float(np.mean([sum(e.target_mask[1:]) if isinstance(e, TokenExample) else 1 for e in whole_examples(task, records)]))


def orthonormal(vectors: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis [r, P] of the span of nonzero `vectors` [B, P]: singular directions
    below 1e-10 of the largest dropped. Rows are normalised first, as gaps, moment gaps and their
    curvature products differ in scale by orders of magnitude."""
    _, sv, vh = torch.linalg.svd(vectors / vectors.norm(dim=1, keepdim=True), full_matrices=False)
    return vh[sv > 1e-10 * sv.max()]
