"""One recorded stage replayed exactly as it ran, so that MAGIC can differentiate through it: from
the stage's start (its parameters and the optimizer moments it inherited), over the recorded
batches, with the recorded learning rate, clipping factor and Adam step count of every step and
each parameter group's weight decay.

The clipping factor is replayed as recorded, a constant: the replay reproduces the run, and its
metagradient leaves out how clipping itself responds to a record's weight (nothing when the run
was not clipped).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import TrainConfig
from ..data import as_records, id_positions, record_ids
from ..errors import UserError
from ..task import Task, batch_normaliser
from ..training import Replay, State
from .trajectory import StepRecord, Trajectory


def _one_value(steps: list[StepRecord], field: str, stage: str) -> float:
    """A setting that every step and parameter group of the stage shares, or a one-line refusal."""
    values = {v for r in steps for v in getattr(r, field)}
    if len(values) != 1:
        raise UserError(f"stage {stage!r} has different {field} across its parameter groups or steps ({sorted(values)}): MAGIC replays one value")
    return values.pop()


class StageReplay(Replay):
    """`Replay` of stage `stage` of a recorded trajectory on `records` (the stage's training records,
    with the ids its batches were recorded by; a list's `id` field, or its position).

        replay = StageReplay("runs/traj", "sft-2", model, task, sft2_records)
        replay.train()   # the stage's end parameters, as recorded
    """

    def __init__(self, trajectory: Trajectory | str | Path, stage: str, model: torch.nn.Module, task: Task, records, batch_loss: str = "token-mean"):
        traj = trajectory if isinstance(trajectory, Trajectory) else Trajectory(trajectory)
        st = traj.stage(stage)
        steps = traj.steps[st.start : st.stop]
        if not steps:
            raise UserError(f"stage {stage!r} has no recorded steps")
        if any(r.ids is None for r in steps):
            raise UserError(f"stage {stage!r} was recorded without its batches (recorder.step(..., ids=) or collate_with_ids): it cannot be replayed")
        if any(r.accumulation != 1 for r in steps):
            raise UserError(f"stage {stage!r} accumulated gradients over several backward passes: its replay is not supported")
        adam = steps[0].kind == "adam"
        if adam != steps[0].decoupled and any(wd for r in steps for wd in r.weight_decay):  # without decay the two agree
            raise UserError(
                f"stage {stage!r} uses {'Adam with coupled (L2)' if adam else 'SGD with decoupled'} weight decay: MAGIC replays AdamW and SGD"
            )
        if _one_value(steps, "dampening", stage):
            raise UserError(f"stage {stage!r} uses SGD dampening: MAGIC's replay does not")
        records = as_records(records)
        position = id_positions(record_ids(records))
        missing = next((i for r in steps for i in r.ids if str(i) not in position), None)
        if missing is not None:
            raise UserError(f"record {missing!r} of stage {stage!r}'s batches is not among the {len(records)} records given")
        self.recorded = [[position[str(i)] for i in r.ids] for r in steps]
        if any(len(set(r.lr)) != 1 for r in steps):
            raise UserError(f"stage {stage!r} gives its parameter groups different learning rates: MAGIC replays one per step")
        config = TrainConfig(
            optimizer="adamw" if adam else "sgd",
            lr=steps[0].lr[0],
            momentum=0.0 if adam else _one_value(steps, "momentum", stage),
            nesterov=bool(_one_value(steps, "nesterov", stage)),
            beta1=_one_value(steps, "momentum", stage) if adam else 0.9,
            beta2=_one_value(steps, "beta2", stage) if adam else 0.999,
            adam_eps=_one_value(steps, "eps", stage) if adam else 1e-8,
            lr_per_step=[r.lr[0] for r in steps],
        )
        self.clips, self.counts = [r.clip for r in steps], [r.count for r in steps]
        if any(r.weight_decay != steps[0].weight_decay for r in steps):
            raise UserError(f"stage {stage!r} changes its weight decay between steps: MAGIC replays one per parameter group")
        self.decays = {n: wd for names, wd in zip(st.groups, steps[0].weight_decay) for n in names}
        self.batch_loss = batch_loss
        self.start, self.moments = traj.params_at(stage, False), traj.moments_at(stage, False)
        super().__init__(model, task, records, config)
        # what the optimizer held, not what the model marks trainable (a model loaded to replay
        # trains everything; the run may have frozen some)
        stepped = {n for names in st.groups for n in names}
        params = dict(model.named_parameters())
        absent = sorted(n for n in stepped if n not in params or n not in self.start)
        if absent:
            raise UserError(f"the model or the trajectory has no parameter {absent[0]!r} of stage {stage!r}'s optimizer: another architecture")
        self.names = [n for n in params if n in stepped]

    def batches(self, n: int) -> list[list[int]]:
        return self.recorded

    def initial_state(self) -> State:
        s = super().initial_state()
        first = "exp_avg" if self.config.optimizer == "adamw" else "momentum_buffer"
        for n in self.names:
            s[f"p.{n}"] = self.start[n].to(s[f"p.{n}"])
            for prefix, key in (("m", first), ("v", "exp_avg_sq")):
                if f"{prefix}.{n}" in s and n in self.moments.get(key, {}):
                    s[f"{prefix}.{n}"] = self.moments[key][n].to(s[f"{prefix}.{n}"])
        return s

    def loss_normaliser(self, idx: list[int], batch: dict) -> int:
        return batch_normaliser(batch, self.batch_loss)

    def clip(self, t: int, grads: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return grads if self.clips[t] == 1.0 else tuple(g * self.clips[t] for g in grads)

    def weight_decay(self, name: str) -> float:
        return self.decays[name]

    def count(self, t: int) -> int:
        return self.counts[t]
