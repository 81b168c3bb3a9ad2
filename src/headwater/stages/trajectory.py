"""A training trajectory, recorded once and used by every stage estimator.

    recorder = TrajectoryRecorder("runs/traj", model)              # a plain PyTorch loop
    recorder.begin_stage("pretrain", optimizer)
    for batch in batches:
        loss.backward(); clip_grad_norm_(...); optimizer.step()
        recorder.step(optimizer, ids=batch_ids)                     # before scheduler.step(), zero_grad()
    recorder.close()

    Trainer(..., callbacks=[TrajectoryRecorder("runs/traj", stage="sft-1")])   # Hugging Face

A run directory holds `trajectory.json` (stages, their step ranges, parameter groups, whether the
optimizer was re-created), `steps.jsonl` (one line per optimizer step: the learning rate, weight
decay, momentum / betas, eps, Nesterov, whether decay is decoupled, the clipping factor actually
applied, gradient accumulation, the optimizer's step count and the records of the batch), and
safetensors of the parameters and optimizer state at every stage boundary. Memory and disk are
O(stages × parameters), never O(steps × parameters), unless `checkpoint_every` asks for the
parameters every N steps as well (`checkpoints/`): the curvature estimator takes each step's
curvature at the run's parameters interpolated between the nearest saved ones, so more
checkpoints make it more exact (every step: exact to first order).
"""

from __future__ import annotations

import collections
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from ..store import atomic_write_bytes, write_json

FORMAT = "headwater.trajectory/1"
MOMENTS = ("exp_avg", "exp_avg_sq", "momentum_buffer")


@dataclass
class StepRecord:
    """The optimizer's real settings at one step, per parameter group."""

    step: int
    stage: str
    kind: str  # "sgd" or "adam"
    decoupled: bool  # weight decay applied to the parameters (AdamW, SGDW), not added to the gradient
    lr: list[float]
    weight_decay: list[float]
    momentum: list[float]  # SGD's momentum; Adam's beta1
    dampening: list[float]
    nesterov: list[bool]
    beta2: list[float]
    eps: list[float]
    clip: float = 1.0  # factor the gradient was scaled by (1: not clipped)
    count: int = 0  # the optimizer's step count after this step (Adam's bias correction)
    accumulation: int = 1  # backward passes summed into this step's gradient
    ids: list | None = None  # the records of this step's batch, when known

    @classmethod
    def from_dict(cls, d: dict) -> StepRecord:
        return cls(**d)


@dataclass
class Stage:
    name: str
    start: int  # first step (global step index)
    stop: int  # one past the last step
    recreated: bool  # the optimizer started fresh at this stage's start
    groups: list[list[str]] = field(default_factory=list)  # parameter names of each optimizer group
    count: int = 0  # the optimizer's step count when the stage started (0 when re-created)


def optimizer_kind(optimizer: torch.optim.Optimizer) -> tuple[str, bool]:
    """("sgd" | "adam", decoupled weight decay?) from the optimizer's class and settings."""
    name = type(optimizer).__name__.lower()
    group = optimizer.param_groups[0]
    if group.get("maximize"):
        raise UserError("an optimizer that maximizes is not supported by the stage estimators")
    # optimizers whose groups look like Adam's or SGD's but whose step is another
    other = any(o in name for o in ("nadam", "radam", "adamax", "adagrad", "adadelta", "rmsprop", "lion", "lamb", "sparseadam"))
    if "betas" in group and not other:
        if group.get("amsgrad"):
            raise UserError("AMSGrad is not supported by the stage estimators")
        return "adam", "adamw" in name or bool(group.get("decoupled_weight_decay", False))
    if ("momentum" in group or name == "sgd") and not other:
        return "sgd", "sgdw" in name or bool(group.get("decoupled_weight_decay", False))
    raise UserError(f"the stage estimators know SGD (with momentum, Nesterov, weight decay) and Adam/AdamW, not {type(optimizer).__name__}")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))


class TrajectoryRecorder:
    """Records a run's stages into a directory: a plain-loop recorder and a `transformers`
    `TrainerCallback` (pass `stage=`; each Trainer run appends its stage to the same directory).
    `checkpoint_every=N` also saves the parameters every N optimizer steps inside each stage."""

    def __init__(self, path: str | Path, model: torch.nn.Module | None = None, stage: str | None = None, checkpoint_every: int | None = None):
        if checkpoint_every is not None and checkpoint_every < 1:
            raise UserError(f"checkpoint_every must be a positive number of steps, not {checkpoint_every}")
        self.path = Path(path)
        self.model, self.stage_name, self.checkpoint_every = model, stage, checkpoint_every
        self.meta = self._open()
        self.stage: Stage | None = None
        self._hooks: list = []
        self._pre_norm2: dict[int, torch.Tensor] = {}
        self._backwards: dict[int, int] = {}
        self._pending_ids: list = []
        self._collated: collections.deque = collections.deque()
        self.optimizer: torch.optim.Optimizer | None = None
        self._last_count = (
            self.meta["stages"][-1]["count"] + self.meta["stages"][-1]["stop"] - self.meta["stages"][-1]["start"] if self.meta["stages"] else 0
        )

    # ------------------------------------------------------------------ plain-loop API

    def begin_stage(self, name: str, optimizer: torch.optim.Optimizer) -> None:
        """Start stage `name`: save the parameters and optimizer state it starts from."""
        if self.model is None:
            raise UserError("the recorder needs the model: TrajectoryRecorder(path, model)")
        if self.stage is not None:
            self.end_stage()
        if any(s["name"] == name for s in self.meta["stages"]):
            raise UserError(f"{self.path} already has a stage named {name!r}")
        names = self._param_names()
        if not self.meta["params"]:
            self.meta["params"] = names
        elif self.meta["params"] != names:
            raise UserError("the model's trainable parameters differ from the recorded stages'")
        has_state = any(optimizer.state.get(p) for g in optimizer.param_groups for p in g["params"])
        recreated = not self.meta["stages"] or not has_state
        start = self.meta["steps"]
        by_id = {id(p): n for n, p in self.model.named_parameters()}
        groups = [[by_id[id(p)] for p in g["params"] if id(p) in by_id] for g in optimizer.param_groups]
        count = 0 if recreated else self._last_count
        self.stage = Stage(name, start, start, recreated, groups, count)
        self.optimizer = optimizer
        self._save_boundary(f"{name}-start", optimizer)
        self._watch()

    def step(self, optimizer: torch.optim.Optimizer, ids: list | None = None) -> None:
        """Record the optimizer step just taken: call it after `optimizer.step()`, before the
        scheduler steps and the gradients are zeroed."""
        if self.stage is None:
            raise UserError("call begin_stage(name, optimizer) before recording steps")
        kind, decoupled = optimizer_kind(optimizer)
        groups = optimizer.param_groups
        self.optimizer = optimizer
        count = self.stage.count + self.meta["steps"] - self.stage.start + 1  # steps since the optimizer was created
        if ids is None and self._pending_ids:
            ids = list(self._pending_ids)
        self._pending_ids.clear()
        record = StepRecord(
            step=self.meta["steps"],
            stage=self.stage.name,
            kind=kind,
            decoupled=decoupled,
            lr=[float(g["lr"]) for g in groups],
            weight_decay=[float(g.get("weight_decay", 0.0)) for g in groups],
            momentum=[float(g["betas"][0] if kind == "adam" else g.get("momentum", 0.0)) for g in groups],
            dampening=[float(g.get("dampening", 0.0)) for g in groups],
            nesterov=[bool(g.get("nesterov", False)) for g in groups],
            beta2=[float(g["betas"][1]) if kind == "adam" else 0.0 for g in groups],
            eps=[float(g.get("eps", 0.0)) for g in groups],
            clip=self._clip_factor(),
            count=count,
            accumulation=max(self._backwards.values(), default=1),
            ids=None if ids is None else [x if isinstance(x, (int, str)) else str(x) for x in ids],
        )
        with open(self.path / "steps.jsonl", "a") as fh:
            fh.write(json.dumps(record.__dict__) + "\n")
        self.meta["steps"] += 1
        self.stage.stop = self.meta["steps"]
        if self.checkpoint_every and (self.stage.stop - self.stage.start) % self.checkpoint_every == 0:
            step = self.meta["steps"]  # the parameters the next step starts from
            (self.path / "checkpoints").mkdir(exist_ok=True)
            save_tensors(self.path / "checkpoints" / f"{step:09d}.safetensors", {n: p for n, p in self.model.named_parameters() if p.requires_grad})
            self.meta.setdefault("checkpoints", []).append(step)
        self._pre_norm2.clear()
        self._backwards.clear()
        self._last_count = count

    def end_stage(self) -> None:
        """Close the current stage: save the parameters and optimizer state it ends at."""
        if self.stage is None:
            return
        self._unwatch()
        self._save_boundary(f"{self.stage.name}-end", self.optimizer)
        self.meta["stages"].append(self.stage.__dict__)
        self.stage = None
        write_json(self.path / "trajectory.json", self.meta)

    def close(self) -> None:
        self.end_stage()

    def collate_with_ids(self, collator, id_key: str = "id"):
        """Wrap a data collator so the records of each batch are recorded (their `id_key` is
        removed before `collator`); with the Hugging Face Trainer keep the column with
        `remove_unused_columns=False`, and give evaluation records no id.

        Loaders collate ahead of training (accelerate fetches the next batch early), so each
        batch's ids wait in a queue that the model's training forward passes take in order."""

        def collate(features):
            ids = [f.pop(id_key) for f in features if id_key in f]
            if ids:
                self._collated.append(ids)
            return collator(features)

        return collate

    # ------------------------------------------------------------------ transformers.TrainerCallback

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.model = self.model if self.model is not None else model
        self.begin_stage(self.stage_name or f"stage-{len(self.meta['stages'])}", optimizer)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.step(optimizer)

    def on_train_end(self, args, state, control, **kwargs):
        self.end_stage()

    def __getattr__(self, name):  # the other TrainerCallback events: nothing to record
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    # ------------------------------------------------------------------ internals

    def _open(self) -> dict:
        meta_path = self.path / "trajectory.json"
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if meta.get("format") != FORMAT:
                raise UserError(f"{self.path} is not a headwater trajectory")
            return meta
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "boundaries").mkdir(exist_ok=True)
        return {"format": FORMAT, "params": [], "stages": [], "steps": 0}

    def _param_names(self) -> list[str]:
        return [n for n, p in self.model.named_parameters() if p.requires_grad]

    def _save_boundary(self, name: str, optimizer) -> None:
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        save_tensors(self.path / "boundaries" / f"{name}.params.safetensors", params)
        moments = {}
        if optimizer is not None:
            by_id = {id(p): n for n, p in params.items()}
            for group in optimizer.param_groups:
                for p in group["params"]:
                    for key in MOMENTS:
                        value = optimizer.state.get(p, {}).get(key)
                        if value is not None and id(p) in by_id:
                            moments[f"{key}/{by_id[id(p)]}"] = value
        save_tensors(self.path / "boundaries" / f"{name}.optimizer.safetensors", moments)

    def _watch(self) -> None:
        """Hooks that see each parameter's gradient after every backward, before any clipping,
        and each training forward pass (which takes its batch's queued ids)."""
        for p in self.model.parameters():
            if p.requires_grad:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._seen))
        self._hooks.append(self.model.register_forward_pre_hook(self._forward))

    def _forward(self, module, args) -> None:
        if module.training and self._collated:
            self._pending_ids.extend(self._collated.popleft())

    def _seen(self, p: torch.Tensor) -> None:
        self._pre_norm2[id(p)] = p.grad.detach().double().pow(2).sum()
        self._backwards[id(p)] = self._backwards.get(id(p), 0) + 1

    def _unwatch(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _clip_factor(self) -> float:
        """Norm of the gradient the optimizer used over its norm before clipping (1: unclipped)."""
        if not self._pre_norm2:
            return 1.0
        before = math.sqrt(float(sum(self._pre_norm2.values())))
        after = math.sqrt(float(sum(p.grad.detach().double().pow(2).sum() for p in self.model.parameters() if p.grad is not None)))
        return 1.0 if before == 0 else min(1.0, after / before)


# ----------------------------------------------------------------------------------------- reading


class Trajectory:
    """The read side of a run directory: stages, per-step settings, boundary states."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / "trajectory.json"
        if not meta_path.exists():
            raise UserError(f"{self.path} is not a recorded trajectory (no trajectory.json): record one with TrajectoryRecorder")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise UserError(f"{self.path} is not a headwater trajectory")
        self.params: list[str] = self.meta["params"]
        self.stages = [Stage(**s) for s in self.meta["stages"]]
        lines = (self.path / "steps.jsonl").read_text().splitlines() if (self.path / "steps.jsonl").exists() else []
        self.steps = [StepRecord.from_dict(json.loads(line)) for line in lines if line.strip()]
        if not self.stages or len(self.steps) != self.stages[-1].stop:
            raise UserError(
                f"{self.path} has {len(self.steps)} recorded steps for stages ending at step {self.stages[-1].stop if self.stages else 0}"
            )
        self.ignores: list[str] = self.meta.get("ignores", [])
        self.checkpoint_steps: list[int] = self.meta.get("checkpoints", [])

    def __repr__(self) -> str:
        return f"Trajectory({str(self.path)!r}, stages={[s.name for s in self.stages]}, steps={len(self.steps)})"

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise UserError(f"no stage {name!r} in {self.path}; stages: {', '.join(s.name for s in self.stages)}")

    def _tensors(self, name: str) -> dict[str, torch.Tensor]:
        return self._tensors_at(self.path / "boundaries" / f"{name}.safetensors")

    def _tensors_at(self, path: Path) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        if not path.exists():
            raise UserError(f"{path} is missing: the trajectory is incomplete")
        return load_file(str(path))

    def params_at(self, stage: str, end: bool) -> dict[str, torch.Tensor]:
        """Parameters at the start or end of a stage."""
        return self._tensors(f"{stage}-{'end' if end else 'start'}.params")

    def params_before(self, step: int) -> dict[str, torch.Tensor]:
        """Parameters the (global) step `step` started from: a stage's start, a stage's end (the
        next stage's start) or one of the recorder's `checkpoint_every` checkpoints."""
        for s in self.stages:
            if step == s.start:
                return self.params_at(s.name, False)
            if step == s.stop:
                return self.params_at(s.name, True)
        if step not in self.checkpoint_steps:
            raise UserError(f"{self.path} holds no parameters before step {step}")
        return self._tensors_at(self.path / "checkpoints" / f"{step:09d}.safetensors")

    def checkpoint(self, stage: str, model: torch.nn.Module, end: bool = True) -> torch.nn.Module:
        """A copy of `model` holding the parameters at a stage's end (or start)."""
        import copy

        out = copy.deepcopy(model)
        params = self.params_at(stage, end)
        with torch.no_grad():
            for name, p in out.named_parameters():
                if name in params:
                    p.copy_(params[name])
        return out.eval()

    def learning_rate_sum(self, stage: str) -> float:
        """Σ of the (first group's) learning rate times the clipping factor over a stage's steps:
        how far the stage moved per unit gradient (TracIn's checkpoint weight)."""
        st = self.stage(stage)
        return float(sum(self.steps[t].lr[0] * self.steps[t].clip for t in range(st.start, st.stop)))

    def moments_at(self, stage: str, end: bool) -> dict[str, dict[str, torch.Tensor]]:
        """Optimizer moments ({exp_avg, exp_avg_sq, momentum_buffer: {param: tensor}}) at a
        stage's start (after any re-creation: empty) or end."""
        flat = self._tensors(f"{stage}-{'end' if end else 'start'}.optimizer")
        out: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in flat.items():
            kind, _, name = key.partition("/")
            out.setdefault(kind, {})[name] = value
        if not end and self.stage(stage).recreated:
            return {}
        return out
