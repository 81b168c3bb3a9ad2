"""Least-squares training runs recorded by `TrajectoryRecorder`, shared by the stage tests: a
linear model under squared error, whose update is affine in the parameters, so linearised
propagation and the curvature-aware estimator are exact on it."""

import torch

import headwater as hw

D, N = 4, 24


def problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = x @ torch.randn(D, generator=g, dtype=torch.float64) + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)
    records = [{"id": f"r{i}", "x": x[i], "y": y[i]} for i in range(N)]
    torch.manual_seed(seed)
    model = torch.nn.Linear(D, 1).double()
    return model, hw.ModuleTask("mse"), records


def batch_hessian(records, ids) -> torch.Tensor:
    """The exact Hessian of the mean squared error of a batch over (weight, bias): (2/|B|) Σ x̃ x̃ᵀ."""
    x = torch.stack([torch.cat([r["x"], torch.ones(1, dtype=torch.float64)]) for r in records if r["id"] in ids])
    return 2 * x.T @ x / len(x)


def make_optimizer(kind, model, lr=0.1):
    weight, bias = model.weight, model.bias
    groups = [{"params": [weight], "weight_decay": 0.05}, {"params": [bias], "weight_decay": 0.0}]  # per-group decay
    return {
        "sgd": lambda: torch.optim.SGD(groups, lr=lr),
        "momentum": lambda: torch.optim.SGD(groups, lr=lr, momentum=0.9),
        "nesterov": lambda: torch.optim.SGD(groups, lr=lr, momentum=0.8, nesterov=True),
        "sgdw": lambda: SGDW(groups, lr=lr, momentum=0.9),
        "adam": lambda: torch.optim.Adam(groups, lr=lr / 10, betas=(0.8, 0.95)),
        "adamw": lambda: torch.optim.AdamW(groups, lr=lr / 10, betas=(0.9, 0.99)),
    }[kind]()


class SGDW(torch.optim.SGD):
    """SGD with decoupled weight decay (θ ← (1 − ηλ)θ before the step, Loshchilov & Hutter), flagged
    as torch flags AdamW's: `decoupled_weight_decay` in the groups."""

    def __init__(self, groups, **kw):
        super().__init__([{**g, "decoupled_weight_decay": True} for g in groups], **kw)

    @torch.no_grad()
    def step(self, closure=None):
        decays = [g["weight_decay"] for g in self.param_groups]
        for g in self.param_groups:
            for p in g["params"]:
                p.mul_(1 - g["lr"] * g["weight_decay"])
            g["weight_decay"] = 0.0
        try:
            return super().step(closure)
        finally:
            for g, wd in zip(self.param_groups, decays):
                g["weight_decay"] = wd


def schedule(name, opt, steps):
    from transformers import get_scheduler

    if name == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    return get_scheduler("cosine" if name == "cosine" else "constant", opt, num_warmup_steps=2 if name == "cosine" else 0, num_training_steps=steps)


def run_stage(recorder, model, task, records, opt, steps, name, batch=6, clip=None, sched="constant", seed=0):
    """A plain training loop over mini-batches, recorded as stage `name`."""
    recorder.begin_stage(name, opt)
    lr_sched = schedule(sched, opt, steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        chosen = torch.randperm(N, generator=g)[:batch].tolist()
        loss = task.loss(model, task.collate([task.whole(records[i]) for i in chosen])).mean()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        recorder.step(opt, ids=[records[i]["id"] for i in chosen])
        lr_sched.step()
        opt.zero_grad()
    recorder.end_stage()


def retrain_without(traj, k: int, records):
    """The run with stage k's updates skipped: stage k+1 starts from stage k's start (parameters
    and, when its optimizer continues, the optimizer state); later stages replay their batches
    with their recorded settings, as torch.optim.SGD (and SGDW) compute them."""
    model, task, _ = problem()
    first = traj.stages[k]
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(traj.params_at(first.name, False)[n])
    buffers = {n: v.clone() for n, v in traj.moments_at(first.name, False).get("momentum_buffer", {}).items()}
    for stage in traj.stages[k + 1 :]:
        if stage.recreated:
            buffers = {}
        for t in range(stage.start, stage.stop):
            rec = traj.steps[t]
            model.zero_grad()
            task.loss(model, task.collate([task.whole(r) for r in records if r["id"] in rec.ids])).mean().backward()
            with torch.no_grad():
                for name, p in model.named_parameters():
                    gi = next(i for i, grp in enumerate(stage.groups) if name in grp)
                    lr, wd, mu = rec.lr[gi], rec.weight_decay[gi], rec.momentum[gi]
                    grad = p.grad * rec.clip
                    if rec.decoupled:
                        p.mul_(1 - lr * wd)
                    else:
                        grad = grad + wd * p
                    if mu:
                        buffers[name] = grad.clone() if name not in buffers else mu * buffers[name] + grad
                        grad = buffers[name]
                    p.sub_(lr * grad)
    return model
