"""MAGIC: exact metagradients of a measurement through a whole training run (arXiv 2504.16430).

Every training example i gets a weight w_i on its loss (w = 1 is the real run). The run is
replayed deterministically (`training.Replay`), so the final parameters are a function θ_T(w) and
the query's objective f(θ_T(w)) can be differentiated exactly:

    adjoint λ_T = ∂f/∂s_T (s = parameters and optimizer state)
    for t = T-1 … 0:  β[batch_t] += λ_{t+1}ᵀ ∂s_{t+1}/∂w_t,   λ_t = (∂s_{t+1}/∂s_t)ᵀ λ_{t+1}

Up-weighting a record that lowers the objective moves the measurement in its direction, so the
score is −β (positive = helps). The metagradient is exact for the one deterministic run it
differentiates; `replay_seeds` averages it over runs with those data orders, which matches a
target averaged over training seeds.

Exact is not the same as predictive: where training is not smooth in the weights (ReLU kinks,
Adam's first steps, the edge of stability) the derivative describes the run only over a tiny
neighbourhood. Every scoring therefore checks the metagradient against one more training run
(`MagicConfig.smoothness_check`), keeps the result in `Scores.diagnostics` and warns when it fails.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

from ..config import MagicConfig
from ..errors import UserError
from ..measurement import Measurement, objective
from ..task import Task, whole_examples
from ..training import Replay
from .base import Blocks, Method, query_records, record_blocks, training_data

# Relative error of the smoothness check above which MAGIC warns. A smooth run (the tanh MLP of
# benchmarks/lds.py) gives 0.004-0.012 at ε = 0.01 over four directions; the ReLU MLP and CNN and
# the AdamW GPT-2 fine-tune, where single-run MAGIC trails EK-FAC by 0.2-0.3 of LDS, 0.13 to 4.4
# (results/magic_smoothness.json).
SMOOTH_ENOUGH = 0.1


class MAGIC(Method):
    """MAGIC scores of the run `config.run` replayed from `model` (its initial parameters θ_0).

    scores = MAGIC(initial_model, task, MagicConfig(run=TrainConfig(...))).fit(train).score(queries)
    """

    name = "magic"
    config_class = MagicConfig

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        task: Task | None = None,
        config: MagicConfig | None = None,
        trajectory=None,
        stage: str | None = None,
    ):
        """With `trajectory` (a `TrajectoryRecorder` run or its path), MAGIC replays its `stage`
        (default: the last) exactly as recorded instead of `config.run`; `model` then only gives
        the architecture, and the records to fit are that stage's."""
        self.model, self.task = model, task
        self.config = config or MagicConfig()
        self.trajectory, self.stage = trajectory, stage

    def fit(self, train, progress: bool = False) -> MAGIC:
        self.data = training_data(train)
        if self.model is None or self.task is None:
            raise UserError("MAGIC needs the run's initial model and task= (the index's model is the trained one)")
        if self.trajectory is not None:
            from ..stages.replay import StageReplay
            from ..stages.trajectory import Trajectory

            if self.config.replay_seeds:
                raise UserError("a recorded stage is one run: replay_seeds do not apply to MAGIC on a trajectory")
            traj = self.trajectory if isinstance(self.trajectory, Trajectory) else Trajectory(self.trajectory)
            stage = self.stage or traj.stages[-1].name
            self.replays = [StageReplay(traj, stage, self.model, self.task, self.data.records, self.config.batch_loss or "token-mean")]
        else:
            if self.config.batch_loss == "token-mean":
                raise UserError(
                    "MAGIC's replay of --optimizer/--lr/... averages each example's loss; --batch-loss is for a recorded stage (--trajectory)"
                )
            seeds = self.config.replay_seeds or [self.config.run.data_seed]
            self.replays = [Replay(self.model, self.task, self.data.records, dataclasses.replace(self.config.run, data_seed=s)) for s in seeds]
        self.progress = progress
        return self

    def score_blocks(self, queries, measurement: Measurement, by: str | None = None) -> Blocks:
        self.fitted()
        records, _ = query_records(queries)
        batch = self.task.collate(whole_examples(self.task, records))
        measure = lambda model: objective(measurement, self.task, model, batch)  # [q]: one reverse pass for all
        beta, f = self.replays[0].metagradient(measure, self.config.checkpoint_every, self.progress)
        self.diagnostics = self.smoothness(measure, (beta, f))
        for r in self.replays[1:]:  # a running sum: one [n, q] array besides the total
            beta += r.metagradient(measure, self.config.checkpoint_every, self.progress)[0]
        yield from record_blocks(torch.from_numpy(-beta / len(self.replays)))

    def smoothness(self, measure, metagradient: tuple) -> dict:
        """The first replayed run's `Replay.metasmoothness` for the queries' mean objective, under
        "smoothness" (with the seed checked and how many runs the scores average); a warning when
        the metagradient misses the finite difference by over 10% or the perturbed run diverges."""
        eps = self.config.smoothness_check
        if not eps:
            return {}
        check = self.replays[0].metasmoothness(measure, eps=eps, metagradient=metagradient)
        passed = check["relative_error"] <= SMOOTH_ENOUGH  # NaN (a diverged run) fails too
        check.update(passed=passed, seed=self.replays[0].config.data_seed, replays=len(self.replays))
        if not passed:
            run = (
                f"stage {self.stage or 'the last'} of the recorded run" if self.trajectory is not None else f"the run with data seed {check['seed']}"
            )
            remedy = "" if self.trajectory is not None else "averaging replay_seeds can help, and "
            warnings.warn(
                f"MAGIC: for a random {eps:g}-reweighting of the records the metagradient of {run} "
                f"predicts {check['predicted']:.3g} and retraining gives {check['finite_difference']:.3g} "
                f"({check['relative_error']:.0%} apart): training is not smooth in the records' weights here (ReLU kinks, "
                f"Adam's first steps or the edge of stability), so one run's scores may not predict retraining; {remedy}"
                "`headwater evaluate lds` compares methods against retraining",
                stacklevel=2,
            )
        return {"smoothness": check}
