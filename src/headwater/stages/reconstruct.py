"""A coarse trajectory rebuilt from stage-boundary Hugging Face checkpoints, for runs that were not
recorded: what `reconstruct` can read from them, and what it has to assume."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import UserError
from ..store import write_json
from .trajectory import FORMAT, MOMENTS, Stage, StepRecord, Trajectory, save_tensors


def reconstruct(out: str | Path, start_model: torch.nn.Module, checkpoints: list[tuple[str, str | Path]]) -> Trajectory:
    """A coarse trajectory from stage-boundary Hugging Face checkpoint folders, when nothing was
    recorded: `start_model` holds θ_0, `checkpoints` are (stage name, folder with the model's
    `model.safetensors`, `optimizer.pt` and `trainer_state.json`) in training order. A stage may
    list several folders (the Trainer's `checkpoint-N` every `save_steps`): all but its last become
    checkpoints inside the stage, where the curvature estimator takes its path.

    What it cannot know, and assumes (listed in `Trajectory.ignores`): learning rates between
    logged steps (interpolated), clipping (taken as 1), decoupled weight decay for Adam-family
    states (the Trainer's AdamW), a new optimizer per stage when the step count restarts, and
    the batches' records (unknown: record-level scores weight a stage's records alike)."""
    out = Path(out)
    if (out / "trajectory.json").exists():
        raise UserError(f"{out} already holds a trajectory")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty: reconstruct writes a new trajectory folder")
    stages: list[tuple[str, list[Path]]] = []  # consecutive folders of one stage: checkpoints inside it, then its end
    for name, folder in checkpoints:
        if stages and stages[-1][0] == name:
            stages[-1][1].append(Path(folder))
        elif any(name == n for n, _ in stages):
            raise UserError(f"stage {name!r} is listed twice with another stage between")
        else:
            stages.append((name, [Path(folder)]))
    for _, folders in stages:  # before anything is written; a stage's inner folders need no optimizer state
        for folder in folders:
            for needed in ("model.safetensors", "trainer_state.json") + (("optimizer.pt",) if folder == folders[-1] else ()):
                if not (folder / needed).exists():
                    raise UserError(f"{folder} has no {needed}: not a Hugging Face checkpoint folder")
    # Written beside `out` and renamed into place at the end: an error half-way (a folder out of
    # order, an unreadable state) leaves nothing behind.
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write_reconstruction(work, start_model, stages)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    work.rename(out)
    return Trajectory(out)


def _write_reconstruction(out: Path, start_model: torch.nn.Module, stages: list[tuple[str, list[Path]]]) -> None:
    """`reconstruct`'s files in `out`: boundaries, inner checkpoints, steps.jsonl, trajectory.json."""
    from safetensors.torch import load_file

    from ..normalizer import load_optimizer_state, param_states

    (out / "boundaries").mkdir()
    (out / "checkpoints").mkdir()
    names = [n for n, p in start_model.named_parameters() if p.requires_grad]
    meta = {
        "format": FORMAT,
        "params": names,
        "stages": [],
        "steps": 0,
        "ignores": [
            "learning rates between logged steps (interpolated from trainer_state.json)",
            "gradient clipping (taken as 1)",
            "decoupled weight decay assumed for Adam-family states (the Trainer's AdamW)",
            "which records were in which batch",
        ],
    }
    previous = {n: p.detach() for n, p in start_model.named_parameters() if p.requires_grad}
    prev_moments: dict = {}
    prev_global, steps = 0, []
    for name, folders in stages:
        folder = folders[-1]
        weights = load_file(str(folder / "model.safetensors"))
        params = {n: weights[n] if n in weights else previous[n] for n in names}
        state = json.loads((folder / "trainer_state.json").read_text())
        global_step = int(state["global_step"])
        recreated = global_step <= prev_global or not meta["stages"]
        n_steps = global_step if recreated else global_step - prev_global
        states = param_states(start_model, load_optimizer_state(folder / "optimizer.pt"))
        moments = {f"{k}/{n}": st[k] for n, (st, _) in states.items() for k in MOMENTS if k in st}
        groups: dict[int, list[str]] = {}
        for n, (_, group) in states.items():
            groups.setdefault(id(group), []).append(n)
        group_settings = {id(g): g for _, g in states.values()}
        logged = sorted((e["step"], e["learning_rate"]) for e in state.get("log_history", []) if "learning_rate" in e)
        start = meta["steps"]
        save_tensors(out / "boundaries" / f"{name}-start.params.safetensors", previous)
        save_tensors(out / "boundaries" / f"{name}-start.optimizer.safetensors", {} if recreated else prev_moments)
        save_tensors(out / "boundaries" / f"{name}-end.params.safetensors", params)
        save_tensors(out / "boundaries" / f"{name}-end.optimizer.safetensors", moments)
        ordered = [group_settings[g] for g in groups]
        adam = "betas" in ordered[0]
        base = 0 if recreated else prev_global
        for i in range(n_steps):
            local = (global_step - n_steps) + i + 1  # the trainer_state's step numbering
            lr = _interpolate(logged, local) if logged else float(ordered[0].get("lr", 0.0))
            steps.append(
                StepRecord(
                    step=start + i,
                    stage=name,
                    kind="adam" if adam else "sgd",
                    decoupled=adam,
                    lr=[lr for _ in ordered],
                    weight_decay=[float(g.get("weight_decay", 0.0)) for g in ordered],
                    momentum=[float(g["betas"][0]) if adam else float(g.get("momentum", 0.0)) for g in ordered],
                    dampening=[float(g.get("dampening", 0.0)) for g in ordered],
                    nesterov=[bool(g.get("nesterov", False)) for g in ordered],
                    beta2=[float(g["betas"][1]) if adam else 0.0 for g in ordered],
                    eps=[float(g.get("eps", 0.0)) for g in ordered],
                    count=base + i + 1,
                ).__dict__
            )
        for inner in folders[:-1]:
            at = start + int(json.loads((inner / "trainer_state.json").read_text())["global_step"]) - (global_step - n_steps)
            if not start < at < start + n_steps or at <= max(meta.get("checkpoints", [start])):
                raise UserError(f"{inner} is not a checkpoint inside stage {name!r} (list a stage's folders in training order)")
            inner_weights = load_file(str(inner / "model.safetensors"))
            save_tensors(out / "checkpoints" / f"{at:09d}.safetensors", {n: inner_weights.get(n, previous[n]) for n in names})
            meta.setdefault("checkpoints", []).append(at)
        meta["stages"].append(Stage(name, start, start + n_steps, recreated, list(groups.values()), base).__dict__)
        meta["steps"] += n_steps
        previous, prev_moments, prev_global = params, moments, global_step
    (out / "steps.jsonl").write_text("".join(json.dumps(st) + "\n" for st in steps))
    write_json(out / "trajectory.json", meta)


def _interpolate(logged: list[tuple[int, float]], step: int) -> float:
    """The learning rate at `step`, linear between the logged (step, lr) points."""
    if step <= logged[0][0]:
        return float(logged[0][1])
    for (s0, a), (s1, b) in zip(logged, logged[1:]):
        if s0 <= step <= s1:
            return float(a + (b - a) * (step - s0) / max(1, s1 - s0))
    return float(logged[-1][1])
