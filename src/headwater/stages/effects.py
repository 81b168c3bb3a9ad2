"""Stage effects: which stage of a recorded run is accountable for a behaviour, and by how much.

The effect of stage k on a behaviour f is E_k = f(θ_T) − f(θ_T with stage k's updates skipped and
the later stages replayed as recorded) = f(θ_T) − f(θ_T − e_k), with e_k the gap that skipping
stage k leaves at the end of the run. Each estimator predicts e_k; the effect is then read out by
evaluating f at θ_T − e_k ("evaluated": it keeps the measurement's own curvature, which dominates
when a stage moves a behaviour by nats) or to first order, ∇f(θ_T)ᵀ e_k ("linear"). The estimators
differ in how e_k is obtained:

- naive: the stage's own displacement, θ_end(k) − θ_start(k);
- propagated: that displacement and the optimizer-state gap it leaves (momentum buffer, Adam's
  first moment, when the optimizer persists) carried through every later step with the real
  schedule: decay, coupled L2, momentum, Adam's recorded preconditioner, clipping, re-creation;
- curvature: the same with each later step's curvature (Hessian-vector products of the step's
  batch at the run's parameters for that step, interpolated between the saved checkpoints):
  exact for least squares, and exact to first order with a checkpoint every step. At scale
  (`curvature_matrix="ekfac"`) each later stage's curvature is one EK-FAC fit instead, and the
  gap crosses the stage elementwise in its eigenbasis (`eigenbasis.py`).

`StageConfig.removed` < 1 takes out only that fraction of a stage's updates: the gaps are linear
in it, and the smaller it is the closer the run's response is to the linearisation.

Each stage's gap is carried forward through the later steps once, for all behaviours. The
completeness decomposition f(θ_end(k)) − f(θ_start(k)) sums exactly to f(θ_T) − f(θ_0). Within a
stage, `records` resolves the (linear) effect to the stage's training records by one adjoint pass.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..collect import tracked_modules
from ..concepts.vector import resolve_measurement
from ..curvature import Curvature, fit_curvature
from ..data import as_records, id_positions, record_ids
from ..errors import UserError
from ..measurement import Loss, Measurement
from ..normalizer import floored
from ..scores import Scores
from ..task import Task, TokenExample, batch_normaliser, collated_batches, whole_examples
from ..training import Bound, twice_differentiable_attention
from .config import StageConfig
from .eigenbasis import StageEigenbasis
from .gauss_newton import curvature_products, output_curvature
from .propagation import ParamSpace, adjoint, forward, step_maps
from .replay import StageReplay
from .trajectory import Trajectory


@dataclass
class StageEffects:
    """Stage × behaviour effects (in the measurement's units), per estimator, beside the additive
    completeness decomposition."""

    stages: list[str]
    behaviours: list[str]
    measurement: dict
    estimates: dict[str, np.ndarray]  # estimator -> [stages, behaviours]
    completeness: np.ndarray  # [stages, behaviours]: f(θ_end(k)) − f(θ_start(k))
    change: np.ndarray  # [behaviours]: f(θ_T) − f(θ_0)
    final: np.ndarray  # [behaviours]: f(θ_T)
    ignores: list[str] = field(default_factory=list)

    def frame(self) -> pd.DataFrame:
        """One row per (behaviour, stage, estimator): effect and its share of the estimator's total."""
        rows = []
        kinds = {**self.estimates, "completeness": self.completeness}
        for b, behaviour in enumerate(self.behaviours):
            for name, values in kinds.items():
                total = float(values[:, b].sum())
                for k, stage in enumerate(self.stages):
                    v = float(values[k, b])
                    rows.append(
                        {"behaviour": behaviour, "stage": stage, "estimator": name, "effect": v, "share": v / total if total else float("nan")}
                    )
        return pd.DataFrame(rows)

    def table(self, estimator: str = "curvature") -> pd.DataFrame:
        """Stages × behaviours of one estimator (falls back to the propagated one)."""
        values = self.estimates.get(estimator, self.estimates.get("propagated", next(iter(self.estimates.values()))))
        return pd.DataFrame(values, index=self.stages, columns=self.behaviours)

    def save(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.frame().to_csv(out / "effects.csv", index=False)
        payload = {
            "stages": self.stages,
            "behaviours": self.behaviours,
            "measurement": self.measurement,
            "ignores": self.ignores,
            "estimates": {k: v.tolist() for k, v in self.estimates.items()},
            "completeness": self.completeness.tolist(),
            "change": self.change.tolist(),
            "final": self.final.tolist(),
        }
        (out / "effects.json").write_text(json.dumps(payload, indent=2))
        return out


class StageAttribution:
    """Stage effects of a recorded trajectory on behaviours, for the model at the run's end.

        stages = StageAttribution("runs/traj", model, task, data={"sft-1": sft1_records})
        effects = stages.effects({"hostile": hostile_prompts, "maths": maths_prompts})

    `data` maps stage names to their training records (needed for the curvature estimator and for
    `records`); the naive and propagated estimators need none. With `curvature_matrix="ekfac"`,
    `curvatures` may give a stage's EK-FAC fit (`fit_curvature`) instead of fitting it here.
    """

    def __init__(
        self,
        trajectory: Trajectory | str | Path,
        model: torch.nn.Module,
        task: Task,
        config: StageConfig | None = None,
        data: dict | None = None,
        measurement: Measurement | None = None,
        curvatures: dict[str, Curvature] | None = None,
    ):
        self.trajectory = trajectory if isinstance(trajectory, Trajectory) else Trajectory(trajectory)
        self.model, self.task = model, task
        self.config = config or StageConfig()
        self.measurement: Measurement = measurement or resolve_measurement(self.config.measurement, self.config.probe) or Loss()
        params = dict(model.named_parameters())
        missing = [n for n in self.trajectory.params if n not in params]
        if missing:
            raise UserError(f"the model has no parameter {missing[0]!r} of the trajectory: another architecture")
        self.space = ParamSpace(self.trajectory.params, {n: params[n].shape for n in self.trajectory.params})
        self.buffers = dict(model.named_buffers())
        self.data = {name: as_records(records) for name, records in (data or {}).items()}
        self.curvatures = dict(curvatures or {})
        for name in [*self.data, *self.curvatures]:
            self.trajectory.stage(name)  # refuses an unknown stage
        self.boundaries = [(self._flat(s.name, False), self._flat(s.name, True)) for s in self.trajectory.stages]
        self.maps = step_maps(self.trajectory, self.space, self._preconditioners())
        self._saved: dict[int, torch.Tensor] = {}  # flattened parameters before a step, as loaded or replayed
        self._replay_tried: set[int] = set()  # curvature_path="replayed": stages replayed, or tried
        self._interpolated: list[str] = []  # the stages that could not be replayed, and why
        self._positions: dict[str, dict[str, int]] = {}  # stage -> record id -> position in its data
        self._bases: dict[int, StageEigenbasis | None] = {}  # curvature_matrix="ekfac": per stage, None without records
        # the steps whose starting parameters are saved: stage boundaries and checkpoints inside stages
        self._saved_steps = sorted({b for s in self.trajectory.stages for b in (s.start, s.stop)} | set(self.trajectory.checkpoint_steps))

    # ------------------------------------------------------------------ the run's recorded states

    def _flat(self, stage: str, end: bool) -> torch.Tensor:
        return self.space.flatten(self.trajectory.params_at(stage, end))

    def _moment_gap(self, k: int) -> torch.Tensor:
        """The optimizer-state gap stage k leaves: its first moment (or momentum buffer) at its
        end minus at its start (after any re-creation)."""
        stage = self.trajectory.stages[k]
        end, start = self.trajectory.moments_at(stage.name, True), self.trajectory.moments_at(stage.name, False)
        key = "exp_avg" if self.trajectory.steps[stage.start].kind == "adam" else "momentum_buffer"
        return self.space.flatten(end.get(key, {})) - self.space.flatten(start.get(key, {}))

    def _preconditioners(self) -> dict[str, torch.Tensor]:
        """Adam's 1/(√v̂ + ε) per stage, from the second moment at the stage's end, each tensor's
        floored at `normalizer.V_FLOOR` of its mean. A coordinate whose gradient stayed at zero
        (GPT-2's attention key biases) ends at v ≈ 0, and 1/ε there turns any gradient the
        counterfactual gives it into a step 10⁵ times its neighbours', where the real Adam step
        is bounded by its learning rate: linearised, its second moment's response is lost."""
        out = {}
        for stage in self.trajectory.stages:
            last = self.trajectory.steps[stage.stop - 1]
            if last.kind != "adam":
                continue
            second = self.trajectory.moments_at(stage.name, True).get("exp_avg_sq", {})
            v = self.space.flatten({n: floored(t.double()) for n, t in second.items()}, missing=-1.0)
            beta2 = self.space.per_group(stage.groups, last.beta2)
            eps = self.space.per_group(stage.groups, last.eps)
            v_hat = v.clamp_min(0) / (1 - beta2**last.count)
            out[stage.name] = torch.where(v >= 0, 1 / (v_hat.sqrt() + eps), torch.zeros_like(v))
        return out

    def _bound(self, theta: torch.Tensor) -> Bound:
        return Bound(self.model, {**self.space.unflatten(theta), **self.buffers})

    # ------------------------------------------------------------------ behaviours

    def _behaviour_batches(self, behaviours: dict) -> dict[str, list]:
        out = {}
        for name, records in behaviours.items():
            examples = whole_examples(self.task, as_records(records))
            if not examples:
                raise UserError(f"behaviour {name!r} has no records")
            out[name] = list(collated_batches(self.task, examples, self.config.batch_size))
        return out

    def _values(self, theta: torch.Tensor, batches: dict[str, list], grad: bool = False):
        """f_b(θ) [B] (mean of the measurement over each behaviour's records) and, with `grad`, ∇f_b [B, P]."""
        values, grads = [], []
        for bs in batches.values():
            th = theta.clone().requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                model = self._bound(th)
                f = sum(self.measurement(self.task, model, b).sum() for b in bs) / sum(len(next(iter(b.values()))) for b in bs)
            values.append(float(f.detach()))
            if grad:
                grads.append(torch.autograd.grad(f, th)[0])
        return np.array(values), (torch.stack(grads) if grad else None)

    # ------------------------------------------------------------------ curvature

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
        modules = tracked_modules(self.model, self.config.modules)
        for k, stage in enumerate(self.trajectory.stages):
            if k < first_stage or k in self._bases:
                continue
            curvature = self.curvatures.get(stage.name)
            if curvature is None and stage.name in self.data:
                models = [self.trajectory.checkpoint(stage.name, self.model, end) for end in (False, True)]
                curvature = fit_curvature(models, self.task, self.data[stage.name], self.config.modules, self.config.ekfac, progress=progress)
                self.curvatures[stage.name] = curvature
            scale = 1.0
            if self.config.batch_loss == "token-mean" and stage.name in self.data:
                scale = 1 / targets_per_example(self.task, self.data[stage.name])
            self._bases[k] = StageEigenbasis(curvature, modules, self.space, scale) if curvature is not None else None
        return self._bases

    def _replay_path(self, first_stage: int, progress: bool = False) -> None:
        """The starting parameters of every step of stage `first_stage` on, from replaying each
        stage over its recorded batches (`StageReplay`); a stage that cannot be replayed keeps
        the interpolated path."""
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
                s = replay.step(s, t, replay.weights_for(ones, t))
        self._saved_steps = sorted(set(self._saved_steps) | set(self._saved))

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
            g = torch.Generator().manual_seed(self.config.sample_seed + k)
            chosen = torch.randperm(len(records), generator=g)[: self.config.hvp_examples].tolist()
        if not chosen:
            return None
        return self.task.collate([self.task.whole(records[i]) for i in chosen])

    def _ids(self, stage: str) -> list:
        return record_ids(self.data[stage])

    # ------------------------------------------------------------------ estimators

    def counterfactual_gap(self, k: int, hvp=None) -> torch.Tensor:
        """e_k = θ_T − θ_T^(−k), [P]: the parameter and moment gaps stage k leaves, carried through
        every later step's linearised update (with its curvature when `hvp` is given).

        Where training runs at the edge of stability (η·λ_max(H) > 2), the linearised steps grow
        a gap that the real, nonlinear run keeps bounded: a gap that outgrows ten times the whole
        run's movement is reported as NaN (the estimate is omitted, not extrapolated)."""
        start, end = self.boundaries[k]
        d_theta, d_m = end - start, self._moment_gap(k)
        bound = self._gap_bound(k)
        for stage in self.trajectory.stages[k + 1 :]:
            if stage.recreated:
                d_m = torch.zeros_like(d_m)
            for t in range(stage.start, stage.stop):
                d_theta, d_m = forward(self.maps[t], d_theta, d_m, hvp(t, d_theta[None])[0] if hvp is not None else None)
            if not float(d_theta.norm()) <= bound:
                return torch.full_like(d_theta, float("nan"))
        return d_theta

    def _gap_bound(self, k: int) -> float:
        """Ten times the whole run's movement plus stage k's: a gap beyond it has diverged."""
        start, end = self.boundaries[k]
        return 10 * float((self.boundaries[-1][1] - self.boundaries[0][0]).norm() + (end - start).norm())

    def eigenbasis_gaps(self, progress: bool = False) -> list[torch.Tensor]:
        """Every stage's e_k [P] with each later stage crossed in its EK-FAC eigenbasis
        (`curvature_matrix="ekfac"`). The gaps cross the stages together: on entering stage j,
        the curvature is made exact on the span of the gaps entering it and their curvature
        products (a few Gauss–Newton products per gap and stage, at the stage's midpoint on a
        sample of its records: `_stage_products`), where KFAC misses the blocks between layers."""
        bases = self._eigenbases(first_stage=1, progress=progress)
        stages = self.trajectory.stages
        gaps = [(end - start, self._moment_gap(k)) for k, (start, end) in enumerate(self.boundaries)]
        for j in tqdm(range(1, len(stages)), desc="curvature (EK-FAC)", disable=not progress):
            stage, maps = stages[j], self.maps[stages[j].start : stages[j].stop]
            if stage.recreated:
                gaps[:j] = [(d_theta, torch.zeros_like(d_m)) for d_theta, d_m in gaps[:j]]
            basis = bases.get(j)
            if basis is None:
                for k in range(j):
                    for m in maps:
                        gaps[k] = forward(m, *gaps[k])
                continue
            basis = self._corrected(j, basis, torch.stack([v for gap in gaps[:j] for v in gap]))
            gaps[:j] = [basis.carry(maps, *gaps[k]) for k in range(j)]
            gaps[:j] = [(d if float(d.norm()) <= self._gap_bound(k) else torch.full_like(d, float("nan")), m) for k, (d, m) in enumerate(gaps[:j])]
        return [d_theta for d_theta, _ in gaps]

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
        bases = dict(self._eigenbases(first_stage))
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
        g = torch.Generator().manual_seed(self.config.sample_seed + j)
        chosen = torch.randperm(len(records), generator=g)[: self.config.hvp_examples].tolist()
        batches = list(collated_batches(self.task, [self.task.whole(records[i]) for i in chosen], self.config.batch_size))
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

    def effects(self, behaviours: dict, progress: bool = False) -> StageEffects:
        """Every stage's effect on every behaviour (a dict name → query records)."""
        batches = self._behaviour_batches(behaviours)
        theta_T = self.boundaries[-1][1]
        final, q = self._values(theta_T, batches, grad=True)
        n = len(self.trajectory.stages)
        gaps = {"naive": [end - start for start, end in self.boundaries], "propagated": [self.counterfactual_gap(k) for k in range(n)]}
        if self.config.curvature and self.config.curvature_matrix == "ekfac" and (self.data or self.curvatures):
            gaps["curvature"] = self.eigenbasis_gaps(progress)
        elif self.config.curvature and self.data:
            hvp = self._hvp(first_stage=1, progress=progress)
            gaps["curvature"] = [self.counterfactual_gap(k, hvp) for k in tqdm(range(n), desc="curvature", disable=not progress)]
        gaps = {name: [self.config.removed * e for e in es] for name, es in gaps.items()}
        estimates = {}
        for name, es in gaps.items():
            if self.config.readout in ("evaluated", "both"):
                estimates[name] = np.stack([final - self._values(theta_T - e, batches)[0] if torch.isfinite(e).all() else final * np.nan for e in es])
            if self.config.readout in ("linear", "both"):
                estimates[f"{name} (linear)"] = torch.stack([q @ e for e in es]).numpy()
        diverged = [f"{name}: {s.name}" for name, es in gaps.items() for s, e in zip(self.trajectory.stages, es) if not torch.isfinite(e).all()]
        values = [self._values(theta, batches)[0] for theta in [self.boundaries[0][0]] + [end for _, end in self.boundaries]]
        completeness = np.stack([values[k + 1] - values[k] for k in range(n)])
        ignores = list(self.trajectory.ignores) + ["the second-moment gap's effect on later Adam steps", "Adam's bias-correction step count"]
        if self.config.curvature and not self.data and not self.curvatures:
            ignores.append("curvature (no stage records given)")
        if "curvature" in gaps and self.config.curvature_matrix == "ekfac":
            ignores.append("each later stage's curvature away from one EK-FAC fit, corrected on the span of the gaps entering it")
            flat = [s.name for k, s in enumerate(self.trajectory.stages) if k >= 1 and self._bases.get(k) is None]
            if flat:
                ignores.append("the curvature of stages with neither records nor a fit (first order there): " + ", ".join(flat))
        if diverged:
            ignores.append("estimates whose linearised propagation diverged (NaN): " + ", ".join(diverged))
        if self._interpolated:
            ignores.append("the replayed path of stages that could not be replayed (interpolated instead): " + "; ".join(self._interpolated))
        return StageEffects(
            [s.name for s in self.trajectory.stages],
            list(batches),
            self.measurement.describe(),
            estimates,
            completeness,
            values[-1] - values[0],
            final,
            ignores,
        )

    def records(self, stage: str, behaviours: dict, curvature: bool = False) -> Scores:
        """Each of `stage`'s training records' contribution to the behaviours, [records, B]:
        positive = the record moved the behaviour's measurement in its direction. A record's
        gradient (at its stage's start and end checkpoints, averaged) is weighted by the adjoint
        of every step whose batch held it (all the stage's steps alike when batches were not
        recorded). The records account for the stage's own gradients: what the stage inherits
        (a momentum buffer from the stage before, decay of the parameters it started from) is
        part of its effect but no record's. With `curvature`, the adjoint carries each step's
        curvature as `config.curvature_matrix` says (ekfac: each stage's eigenbasis, corrected
        on the span of the adjoint vectors entering it from the end of the run)."""
        if stage not in self.data:
            raise UserError(f"give the training records of stage {stage!r} (data={{{stage!r}: records}})")
        k = [s.name for s in self.trajectory.stages].index(stage)
        st, records, ids = self.trajectory.stages[k], self.data[stage], self._ids(stage)
        batches = self._behaviour_batches(behaviours)
        _, q = self._values(self.boundaries[-1][1], batches, grad=True)
        position = id_positions(ids)
        gamma_total = torch.zeros_like(q)
        per_record: dict[int, torch.Tensor] = {}

        def on_step(t, gamma):
            nonlocal gamma_total
            if not st.start <= t < st.stop:
                return
            rec_ids = self.trajectory.steps[t].ids
            if rec_ids is None:
                gamma_total = gamma_total + gamma
                return
            chosen = [position[str(i)] for i in rec_ids if str(i) in position]
            batch = self.task.collate([self.task.whole(records[i]) for i in chosen])
            scale = 1 / batch_normaliser(batch, self.config.batch_loss)
            for i in chosen:
                per_record[i] = per_record.get(i, 0) + gamma * scale

        hvp, on_boundary = None, None
        if curvature and self.config.curvature_matrix == "ekfac":
            hvp, on_boundary = self._eigenbasis_adjoint(k)
        elif curvature:
            hvp = self._hvp(first_stage=k)
        adjoint(self.trajectory, self.maps, q, hvp, on_boundary, on_step)
        # Steps whose batch was not recorded weigh every record of the stage alike: each record is
        # in a batch with probability |B|/n, and then weighs 1/|B| (1/its batch's targets).
        per_target = targets_per_example(self.task, records) if self.config.batch_loss == "token-mean" else 1
        uniform = gamma_total / (len(records) * per_target)
        values = np.zeros((len(records), q.shape[0]))
        for i in range(len(records)):
            w = per_record.get(i, 0) + uniform
            values[i] = (w @ self._record_gradient(k, records[i])).numpy()
        sign = 1.0 if self.measurement.direction == "up" else -1.0
        return Scores(
            sign * values,
            ids,
            list(batches),
            method="stages",
            measurement=self.measurement.describe(),
            config={**self.config.to_dict(), "stage": stage, "curvature": curvature},
        )

    def _record_gradient(self, k: int, record) -> torch.Tensor:
        """∇ of the record's summed loss, averaged over its stage's start and end checkpoints, [P]."""
        batch = self.task.collate([self.task.whole(record)])
        out = 0
        for theta in self.boundaries[k]:
            th = theta.clone().requires_grad_(True)
            with torch.enable_grad():
                loss = self.task.loss(self._bound(th), batch).sum()
                out = out + torch.autograd.grad(loss, th)[0] / 2
        return out


def targets_per_example(task: Task, records) -> float:
    """The mean number of predicted targets per record (1 for a record that is one example)."""
    return float(np.mean([sum(e.target_mask[1:]) if isinstance(e, TokenExample) else 1 for e in whole_examples(task, records)]))


def orthonormal(vectors: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis [r, P] of the span of `vectors` [B, P], directions below 1e-10 of the
    largest dropped."""
    q, r = torch.linalg.qr(vectors.T)
    keep = r.diagonal().abs() > 1e-10 * r.diagonal().abs().max()
    return q.T[keep]
