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

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..concepts.vector import resolve_measurement
from ..curvature import Curvature
from ..data import as_records, id_positions
from ..errors import UserError
from ..measurement import Loss, Measurement
from ..normalizer import floored
from ..scores import Scores
from ..task import Task, batch_normaliser, collated_batches, whole_examples
from ..training import Bound
from .config import StageConfig
from .eigenbasis import StageEigenbasis
from .later_curvature import LaterCurvature, targets_per_example
from .propagation import ParamSpace, adjoint, forward, forward_adam, step_maps
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


class StageAttribution(LaterCurvature):
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
        self._init_curvature()

    # ------------------------------------------------------------------ the run's recorded states

    def _flat(self, stage: str, end: bool) -> torch.Tensor:
        return self.space.flatten(self.trajectory.params_at(stage, end))

    def _moment_gaps(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The optimizer-state gaps stage k leaves, [P] each: its first moment (or momentum buffer)
        and Adam's second moment (zero for SGD) at its end minus at its start (after any
        re-creation). Each boundary's state is read once."""
        stage = self.trajectory.stages[k]
        end, start = self.trajectory.moments_at(stage.name, True), self.trajectory.moments_at(stage.name, False)
        first = "exp_avg" if self.trajectory.steps[stage.start].kind == "adam" else "momentum_buffer"
        return tuple(self.space.flatten(end.get(key, {})) - self.space.flatten(start.get(key, {})) for key in (first, "exp_avg_sq"))

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

    # ------------------------------------------------------------------ estimators

    def counterfactual_gaps(self, hvp=None, bases: dict[int, StageEigenbasis | None] | None = None, progress: bool = False) -> list[torch.Tensor]:
        """e_k = θ_T − θ_T^(−k), [P], for every stage k: the parameter and moment gaps stage k
        leaves, carried through every later step's linearised update: to first order, with each
        step's curvature products `hvp(t, V [B, P])`, or across each later stage in its eigenbasis
        `bases[j]` (made exact on the span of the gaps entering it: `_corrected`). The gaps that
        enter a stage cross it together, [B, P]. With `hvp`, an Adam step replayed with its own
        moments (`curvature_path="replayed"`) takes them, and carries the second-moment gap too.

        Where training runs at the edge of stability (η·λ_max(H) > 2), the linearised steps grow
        a gap that the real, nonlinear run keeps bounded: a gap that outgrows ten times the whole
        run's movement is reported as NaN (the estimate is omitted, not extrapolated)."""
        stages = self.trajectory.stages
        d_theta = torch.stack([end - start for start, end in self.boundaries])
        d_m, d_v = (torch.stack(gaps) for gaps in zip(*(self._moment_gaps(k) for k in range(len(stages)))))
        live: list[int] = []  # the gaps still carried
        for j in tqdm(range(1, len(stages)), desc="curvature", disable=not progress):
            live.append(j - 1)
            stage, rows = stages[j], torch.tensor(live)
            if stage.recreated:
                d_m[rows], d_v[rows] = 0, 0  # a fresh optimizer holds no trace of the gap
            x, y, z = d_theta[rows], d_m[rows], d_v[rows]
            basis = bases.get(j) if bases is not None else None
            if basis is not None:
                x, y = self._corrected(j, basis, torch.cat([x, y])).carry(self.maps[stage.start : stage.stop], x, y)
            else:
                for t in range(stage.start, stage.stop):
                    if hvp is not None and t in self._adam_steps:
                        x, y, z = forward_adam(self.maps[t], self._adam_steps[t], x, y, z, hvp(t, x))
                    else:
                        x, y = forward(self.maps[t], x, y, hvp(t, x) if hvp is not None else None)
            d_theta[rows], d_m[rows], d_v[rows] = x, y, z
            for k in [k for k in live if not float(d_theta[k].norm()) <= self._gap_bound(k)]:
                d_theta[k] = float("nan")
                live.remove(k)
        return list(d_theta)

    def _gap_bound(self, k: int) -> float:
        """Ten times the whole run's movement plus stage k's: a gap beyond it has diverged."""
        start, end = self.boundaries[k]
        return 10 * float((self.boundaries[-1][1] - self.boundaries[0][0]).norm() + (end - start).norm())

    def effects(self, behaviours: dict, progress: bool = False) -> StageEffects:
        """Every stage's effect on every behaviour (a dict name → query records)."""
        batches = self._behaviour_batches(behaviours)
        theta_T = self.boundaries[-1][1]
        final, q = self._values(theta_T, batches, grad=True)
        n = len(self.trajectory.stages)
        gaps = {"naive": [end - start for start, end in self.boundaries], "propagated": self.counterfactual_gaps()}
        # skipping stage k replays the stages after it: their curvature is needed from stage 1 on
        if self.config.curvature and self.config.curvature_matrix == "ekfac" and (self.data or self.curvatures):
            gaps["curvature"] = self.counterfactual_gaps(bases=self._eigenbases(first_stage=1, progress=progress), progress=progress)
        elif self.config.curvature and self.data:
            gaps["curvature"] = self.counterfactual_gaps(self._hvp(first_stage=1, progress=progress), progress=progress)
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
        second = "the second-moment gap's effect on later Adam steps"
        if self._adam_steps:  # replayed Adam stages take it: say what does not
            second += " (modelled by the curvature estimate in the replayed Adam stages)"
        ignores = list(self.trajectory.ignores) + [second, "Adam's bias-correction step count"]
        if self.config.curvature and not self.data and not self.curvatures:
            ignores.append("curvature (no stage records given)")
        if "curvature" in gaps and self.config.curvature_matrix == "ekfac":
            ignores.append(
                "each later stage's curvature away from one EK-FAC fit (corrected on the span of the gaps entering it where its records are given)"
            )
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
