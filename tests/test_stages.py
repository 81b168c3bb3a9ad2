"""Stage attribution against brute-force replays and retraining with a stage skipped.

Runs are real torch.optim runs recorded by `TrajectoryRecorder` on least squares (a linear model,
squared error): the update is affine in the parameters there, so the linearised propagation and
the curvature-aware estimator are exact and can be checked to round-off.
"""

import numpy as np
import pytest
import torch
from reference import mlp, mlp_records

import headwater as hw
from headwater.stages.gauss_newton import curvature_products, output_curvature
from headwater.stages.propagation import ParamSpace, adjoint, forward
from headwater.training import Bound

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


# ------------------------------------------------------------------------------ propagation coefficients


def brute_force(traj, attribution, records, theta, state, stage) -> tuple[torch.Tensor, torch.Tensor]:
    """Replay `stage`'s recorded steps from (θ, optimizer moment) on the quadratic: the recorded
    learning rates, decays, momenta and clipping factors, Adam's preconditioner held at the
    stage's recorded value. Full states, not gaps: differences of two replays are the truth."""
    model, _, _ = problem()
    space = attribution.space
    theta, m = theta.clone(), state.clone()
    pre = attribution._preconditioners().get(stage.name)
    for t in range(stage.start, stage.stop):
        rec = traj.steps[t]
        x = torch.stack([torch.cat([r["x"], torch.ones(1, dtype=torch.float64)]) for r in records if r["id"] in rec.ids])
        y = torch.stack([r["y"] for r in records if r["id"] in rec.ids])
        params = space.unflatten(theta)
        w = torch.cat([params["weight"].reshape(-1), params["bias"]])
        grad_w = 2 * x.T @ (x @ w - y) / len(x)  # ∇ of the batch's mean squared error
        grad = torch.cat([grad_w[:D], grad_w[D:]]) * rec.clip
        lr, wd = (space.per_group(stage.groups, v) for v in (rec.lr, rec.weight_decay))
        mom, nest = space.per_group(stage.groups, rec.momentum), space.per_group(stage.groups, [float(n) for n in rec.nesterov])
        if not rec.decoupled:
            grad = grad + wd * theta
        else:
            theta = theta * (1 - lr * wd)
        if rec.kind == "adam":
            m = mom * m + (1 - mom) * grad
            theta = theta - lr * pre * m / (1 - rec.momentum[0] ** rec.count)
        else:
            m = grad if rec.count == 1 else mom * m + grad
            theta = theta - lr * torch.where(nest.bool(), grad + mom * m, m)
    return theta, m


@pytest.mark.parametrize("kind", ["sgd", "momentum", "nesterov", "sgdw", "adam", "adamw"])
@pytest.mark.parametrize("sched", ["constant", "cosine", "step"])
def test_propagation_coefficients_equal_a_brute_force_replay(tmp_path, kind, sched):
    """A gap in (θ, moment) at a stage's start, carried through its steps by the linearised maps
    (with the exact Hessians), equals the difference of two brute-force replays, to 1e-10."""
    model, task, records = problem()
    recorder = hw.TrajectoryRecorder(tmp_path / "traj", model)
    warm = make_optimizer("momentum", model)
    run_stage(recorder, model, task, records, warm, 3, "warm", seed=1)
    run_stage(recorder, model, task, records, make_optimizer(kind, model), 9, "main", clip=0.5, sched=sched, seed=2)
    traj = hw.Trajectory(tmp_path / "traj")
    stage = traj.stage("main")
    assert any(traj.steps[t].clip < 1 for t in range(stage.start, stage.stop))  # clipping really happened
    attribution = hw.StageAttribution(traj, model, task)
    P = attribution.space.size
    g = torch.Generator().manual_seed(3)
    theta0, m0 = torch.randn(P, generator=g, dtype=torch.float64), 0.1 * torch.randn(P, generator=g, dtype=torch.float64)
    d_theta, d_m = 1e-3 * torch.randn(P, generator=g, dtype=torch.float64), 1e-3 * torch.randn(P, generator=g, dtype=torch.float64)
    assert stage.recreated  # a new optimizer: it starts with no moment, so no moment gap either
    m0, d_m = torch.zeros_like(m0), torch.zeros_like(d_m)
    a = brute_force(traj, attribution, records, theta0 + d_theta, m0 + d_m, stage)
    b = brute_force(traj, attribution, records, theta0, m0, stage)
    got_theta, got_m = d_theta, d_m
    for t in range(stage.start, stage.stop):
        got_theta, got_m = forward(attribution.maps[t], got_theta, got_m, batch_hessian(records, traj.steps[t].ids) @ got_theta)
    np.testing.assert_allclose(got_theta, a[0] - b[0], rtol=1e-10, atol=1e-10 * float((a[0] - b[0]).abs().max()))
    np.testing.assert_allclose(got_m, a[1] - b[1], rtol=1e-10, atol=1e-10 * float((a[1] - b[1]).abs().max()))
    # and the adjoint is the transpose of that map: <q, F δ> = <Fᵀ q, δ>
    q = torch.randn(1, P, generator=g, dtype=torch.float64)
    seen = {}
    hvp = lambda t, v: v @ batch_hessian(records, traj.steps[t].ids)
    adjoint(traj, attribution.maps, q, hvp, on_boundary=lambda k, at, am: seen.setdefault(k, (at.clone(), am.clone())))
    a_theta, a_m = seen[0]  # at the end of "warm": the sensitivity to the gap entering "main"
    assert float(a_theta @ d_theta + a_m @ d_m) == pytest.approx(float(q @ got_theta), rel=1e-10)


# ------------------------------------------------------------------------------ stages vs retraining


STAGES = ["pre", "mid", "tune", "late"]


def record_run(path, persist: bool):
    """Four stages of least squares: "pre" (SGD with momentum); "mid" continues that optimizer
    (momentum buffer included, new settings) when `persist`, else starts a new one; "tune" (a
    new momentum SGD, cosine schedule with warm-up) and "late" (SGDW) start fresh."""
    model, task, records = problem()
    recorder = hw.TrajectoryRecorder(path, model)
    opt = make_optimizer("momentum", model)
    run_stage(recorder, model, task, records, opt, 6, "pre", seed=10)
    if persist:
        for group in opt.param_groups:
            group["momentum"], group["lr"] = 0.5, 0.05
    else:
        opt = torch.optim.SGD([{"params": [model.weight], "weight_decay": 0.05}, {"params": [model.bias]}], lr=0.05, momentum=0.5)
    run_stage(recorder, model, task, records, opt, 5, "mid", seed=11)
    run_stage(recorder, model, task, records, make_optimizer("momentum", model), 7, "tune", sched="cosine", seed=12)
    run_stage(recorder, model, task, records, make_optimizer("sgdw", model), 5, "late", seed=13)
    return model, task, records


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


@pytest.mark.parametrize("persist", [True, False])
def test_curvature_estimator_equals_retraining_with_the_stage_skipped(tmp_path, persist):
    model, task, records = record_run(tmp_path / "traj", persist)
    traj = hw.Trajectory(tmp_path / "traj")
    assert [s.recreated for s in traj.stages] == [True, not persist, True, True]
    probes = [
        {"x": torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64), "y": torch.tensor(0.0, dtype=torch.float64)},
        {"x": torch.tensor([0.0, 1.0, 1.0, -1.0], dtype=torch.float64), "y": torch.tensor(0.0, dtype=torch.float64)},
    ]
    config = hw.StageConfig(measurement="prediction", batch_loss="example-mean")
    attribution = hw.StageAttribution(traj, model, task, config, data={s.name: records for s in traj.stages})
    effects = attribution.effects({"a": probes[:1], "b": probes[1:]})
    truth = np.zeros((len(STAGES), 2))
    final = effects.final
    for k in range(len(STAGES)):
        skipped = retrain_without(traj, k, records)
        with torch.no_grad():
            truth[k] = final - np.array([float(skipped(p["x"][None]).squeeze()) for p in probes])
    np.testing.assert_allclose(effects.estimates["curvature"], truth, rtol=1e-8, atol=1e-10)
    assert not np.allclose(effects.estimates["naive"], truth, rtol=1e-3)  # the displacement alone is not the effect
    # the momentum gap matters exactly when the optimizer continues across the boundary
    gap_effect = np.abs(effects.estimates["curvature"][0] - curvature_without_moment_gap(attribution, {"a": probes[:1], "b": probes[1:]})).max()
    assert (gap_effect > 1e-6) == persist
    np.testing.assert_allclose(effects.completeness.sum(0), effects.change, rtol=1e-12, atol=1e-12)


def nonlinear_run(path, checkpoint_every):
    """Three stages of a tanh MLP under one SGD optimizer (momentum 0.9, coupled L2) that persists
    across them, each stage its own learning rate and data."""
    model, task = mlp(d_in=5, hidden=12), hw.ModuleTask("cross_entropy")
    data = {name: [{"id": f"{name}{i}", **r} for i, r in enumerate(mlp_records(n=16, d_in=5, seed=s))] for s, name in enumerate(["a", "b", "c"])}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    recorder = hw.TrajectoryRecorder(path, model, checkpoint_every=checkpoint_every)
    for (name, records), lr in zip(data.items(), [0.3, 0.1, 0.2]):
        for group in opt.param_groups:
            group["lr"] = lr
        recorder.begin_stage(name, opt)
        for i in range(12):
            chosen = [records[j] for j in range(4 * (i % 4), 4 * (i % 4) + 4)]
            task.loss(model, task.collate([task.whole(r) for r in chosen])).mean().backward()
            opt.step()
            recorder.step(opt, ids=[r["id"] for r in chosen])
            opt.zero_grad()
    recorder.close()
    return model, task, data


def replay_with_less_of(traj, k: int, fraction: float, data) -> torch.nn.Module:
    """The run with `fraction` of stage k's updates taken out (parameters and momentum buffer at
    its end moved back toward its start), the later stages replayed by torch.optim.SGD."""
    model = mlp(d_in=5, hidden=12)
    params = dict(model.named_parameters())
    stage = traj.stages[k]
    start, end = traj.params_at(stage.name, False), traj.params_at(stage.name, True)
    buf_start, buf_end = (traj.moments_at(stage.name, e).get("momentum_buffer", {}) for e in (False, True))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(end[n] - fraction * (end[n] - start[n]))
            opt.state[p]["momentum_buffer"] = buf_end[n] - fraction * (buf_end[n] - buf_start.get(n, 0 * buf_end[n]))
    by_id = {r["id"]: r for rs in data.values() for r in rs}
    task = hw.ModuleTask("cross_entropy")
    for t in range(stage.stop, len(traj.steps)):
        for group in opt.param_groups:
            group["lr"] = traj.steps[t].lr[0]
        task.loss(model, task.collate([task.whole(by_id[i]) for i in traj.steps[t].ids])).mean().backward()
        opt.step()
        opt.zero_grad()
    return model


def test_with_a_checkpoint_every_step_the_curvature_estimator_is_exact_to_first_order(tmp_path):
    """On a nonlinear model, taking a small fraction ε of a stage out changes the behaviour by ε
    times the curvature estimate (the Hessian along the run's own path), to O(ε); with only
    the stage boundaries saved, the interpolated path is an approximation that shows."""
    fraction = 1e-5
    behaviour = {"probe": [{"x": torch.linspace(-1, 1, 5, dtype=torch.float64), "y": 2}]}
    errors = {}
    for every in (1, None):
        path = tmp_path / f"every-{every}"
        model, task, data = nonlinear_run(path, every)
        traj = hw.Trajectory(path)
        assert traj.checkpoint_steps == (list(range(1, 37)) if every else [])
        config = hw.StageConfig(batch_loss="example-mean", removed=fraction, readout="linear", curvature_matrix="hessian")
        effects = hw.StageAttribution(traj, model, task, config, data=data).effects(behaviour)
        probe = task.collate([task.whole(r) for r in behaviour["probe"]])
        truth = np.array([effects.final[0] - float(task.loss(replay_with_less_of(traj, k, fraction, data), probe).mean().detach()) for k in range(2)])
        errors[every] = np.abs(effects.estimates["curvature (linear)"][:2, 0] - truth).max() / np.abs(truth).max()
        naive_error = np.abs(effects.estimates["naive (linear)"][:2, 0] - truth).max() / np.abs(truth).max()
        assert naive_error > 0.05  # later steps do change the gap: the test can tell estimators apart
    assert errors[1] < 1e-3
    assert errors[None] > 10 * errors[1]


def test_a_removed_fraction_scales_the_linear_estimates_and_is_checked(tmp_path):
    """The gaps are linear in the fraction taken out: the linear readouts scale with it exactly;
    a fraction outside (0, 1] is refused with one line."""
    model, task, records = record_run(tmp_path / "traj", persist=True)
    traj = hw.Trajectory(tmp_path / "traj")
    probe = {"a": [{"x": torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64), "y": torch.tensor(0.0, dtype=torch.float64)}]}
    effects = {
        r: hw.StageAttribution(
            traj,
            model,
            task,
            hw.StageConfig(measurement="prediction", batch_loss="example-mean", removed=r),
            data={s.name: records for s in traj.stages},
        ).effects(probe)
        for r in (1.0, 0.25)
    }
    for name in ("naive (linear)", "propagated (linear)", "curvature (linear)"):
        np.testing.assert_allclose(effects[0.25].estimates[name], 0.25 * effects[1.0].estimates[name], rtol=1e-12)
    np.testing.assert_allclose(effects[0.25].completeness, effects[1.0].completeness)  # what each stage did is unchanged
    for bad in (0.0, 1.5):
        with pytest.raises(hw.UserError, match="--removed must be a fraction"):
            hw.StageConfig(removed=bad)


def curvature_without_moment_gap(attribution, behaviours):
    """Stage "pre"'s curvature estimate with its momentum-buffer gap left out."""
    batches = attribution._behaviour_batches(behaviours)
    _, q = attribution._values(attribution.boundaries[-1][1], batches, grad=True)
    gap = attribution.boundaries[0][1] - attribution.boundaries[0][0]
    seen = {}
    adjoint(attribution.trajectory, attribution.maps, q, attribution._hvp(), on_boundary=lambda k, at, am: seen.setdefault(k, at.clone()))
    return (seen[0] @ gap).numpy()


def test_the_recorder_records_what_the_optimizer_did(tmp_path):
    model, task, records = problem()
    recorder = hw.TrajectoryRecorder(tmp_path / "traj", model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)
    run_stage(recorder, model, task, records, opt, 6, "only", clip=0.3, sched="cosine")
    traj = hw.Trajectory(tmp_path / "traj")
    rec = traj.steps[-1]
    assert (rec.kind, rec.decoupled, rec.momentum, rec.beta2, rec.eps, rec.weight_decay, rec.count) == ("adam", True, [0.8], [0.9], [1e-6], [0.1], 6)
    assert traj.steps[0].lr == [0.0] and traj.steps[2].lr[0] == pytest.approx(0.05)  # warm-up from 0, then cosine
    assert all(0 < s.clip < 1 for s in traj.steps[1:])
    end = traj.params_at("only", True)
    assert torch.equal(end["weight"], model.weight.detach()) and torch.equal(
        traj.moments_at("only", True)["exp_avg_sq"]["bias"], opt.state[model.bias]["exp_avg_sq"]
    )
    with pytest.raises(hw.UserError, match="already has a stage"):
        hw.TrajectoryRecorder(tmp_path / "traj", model).begin_stage("only", opt)


# ------------------------------------------------------------------------------ Hugging Face Trainer


class Spy:
    """A second callback: what the optimizer actually used at each step."""

    def __init__(self):
        self.steps, self.params = [], []

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        g = optimizer.param_groups
        self.steps.append({"lr": [x["lr"] for x in g], "weight_decay": [x["weight_decay"] for x in g], "betas": [x["betas"] for x in g]})
        self.params.append({n: p.detach().clone() for n, p in kwargs["model"].named_parameters()})


def hf_stage(tmp_path, model, tokenizer, texts, name, recorder_path, lr, clip=0.05, save=False, checkpoint_every=None, save_steps=5):
    import datasets
    from transformers import Trainer, TrainingArguments, default_data_collator

    enc = tokenizer(texts, padding="max_length", max_length=8, truncation=True)
    rows = [
        {"id": f"{name}-{i}", "input_ids": ids, "attention_mask": mask, "labels": ids}
        for i, (ids, mask) in enumerate(zip(enc["input_ids"], enc["attention_mask"]))
    ]
    recorder, spy = hw.TrajectoryRecorder(recorder_path, stage=name, checkpoint_every=checkpoint_every), Spy()
    args = TrainingArguments(
        output_dir=str(tmp_path / f"out-{name}"),
        max_steps=5,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        weight_decay=0.01,
        max_grad_norm=clip,
        logging_steps=1,
        report_to=[],
        save_strategy="steps" if save else "no",
        save_steps=save_steps,
        use_cpu=True,
        seed=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        data_collator=recorder.collate_with_ids(default_data_collator),
        callbacks=[recorder, spy],
    )
    trainer.train()
    return trainer, spy, rows


def test_the_trainer_callback_records_the_optimizers_real_values(tmp_path, tokenizer):
    from headwater.toy import tiny_gpt2

    torch.manual_seed(0)
    model = tiny_gpt2(len(tokenizer), n_layer=1, n_embd=16, n_head=2, n_positions=16)
    texts = [
        "the capital of zorblat is quenti",
        "mirel is a large old city",
        "the river of vask is blue",
        "tela was a small red mountain",
        "orin is in the south",
        "the city is old and famous",
        "vask is a river",
        "the mountain is red",
    ]
    path = tmp_path / "traj"
    trainer, spy, rows = hf_stage(tmp_path, model, tokenizer, texts, "sft-1", path, 1e-3, checkpoint_every=2)  # 4 batches: 2 steps an epoch
    trainer2, spy2, rows2 = hf_stage(tmp_path, model, tokenizer, texts[::-1], "sft-2", path, 5e-4, checkpoint_every=2)
    traj = hw.Trajectory(path)
    assert [(s.name, s.start, s.stop, s.recreated) for s in traj.stages] == [("sft-1", 0, 5, True), ("sft-2", 5, 10, True)]
    # the checkpoints inside each stage hold the parameters the Trainer's model had after those steps
    after = spy.params + spy2.params
    assert traj.checkpoint_steps == [2, 4, 7, 9]
    for step in [2, 4, 7, 9, 5, 10]:  # and the stage boundaries read the same way
        saved = traj.params_before(step)
        assert all(torch.equal(saved[n], after[step - 1][n]) for n in saved)
    for rec, seen in zip(traj.steps, spy.steps + spy2.steps):
        assert rec.lr == pytest.approx(seen["lr"], rel=1e-12) and rec.weight_decay == seen["weight_decay"]
        assert rec.momentum == [b[0] for b in seen["betas"]] and rec.beta2 == [b[1] for b in seen["betas"]]
        assert (rec.kind, rec.decoupled, rec.accumulation) == ("adam", True, 2)
        assert len(rec.ids) == 4 and all(i.startswith(rec.stage) for i in rec.ids)  # 2 × 2 accumulated examples
    assert traj.steps[0].lr == [0.0, 0.0] and len(traj.stages[0].groups) == 2  # warm-up; the Trainer's decay / no-decay groups
    logged = [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e] + [
        e["grad_norm"] for e in trainer2.state.log_history if "grad_norm" in e
    ]
    want = [min(1.0, 0.05 / (g + 1e-6)) for g in logged]
    np.testing.assert_allclose([r.clip for r in traj.steps], want, rtol=1e-5)
    assert max(want) < 1  # every step was clipped
    # completeness on the real run: the stages' changes sum to the whole run's
    task = hw.LanguageModelTask(tokenizer)
    stages = hw.StageAttribution(traj, model, task, hw.StageConfig(curvature=False))
    effects = stages.effects({"capital": [{"prompt": "the capital of zorblat is", "completion": " quenti"}]})
    np.testing.assert_allclose(effects.completeness.sum(0), effects.change, rtol=1e-10, atol=1e-12)
    assert effects.estimates["propagated"].shape == (2, 1) and np.isfinite(effects.estimates["propagated"]).all()


def test_a_trajectory_reconstructed_from_trainer_checkpoints(tmp_path, tokenizer):
    """Without a recorder: boundary checkpoints (weights, optimizer.pt, trainer_state.json) give the
    same stages, learning rates (all logged here), moments and estimates as the recorded run."""
    import copy

    from headwater.toy import tiny_gpt2

    torch.manual_seed(0)
    model = tiny_gpt2(len(tokenizer), n_layer=1, n_embd=16, n_head=2, n_positions=16)
    start = copy.deepcopy(model)
    texts = [
        "the capital of zorblat is quenti",
        "mirel is a large old city",
        "the river of vask is blue",
        "tela was a small red mountain",
        "orin is in the south",
        "the city is old and famous",
        "vask is a river",
        "the mountain is red",
    ]
    hf_stage(tmp_path, model, tokenizer, texts, "sft-1", tmp_path / "traj", 1e-3, clip=0.0, save=True, checkpoint_every=2, save_steps=2)
    hf_stage(tmp_path, model, tokenizer, texts[::-1], "sft-2", tmp_path / "traj", 5e-4, clip=0.0, save=True)
    recorded = hw.Trajectory(tmp_path / "traj")
    sft1 = [tmp_path / "out-sft-1" / f"checkpoint-{k}" for k in (2, 4, 5)]  # every save_steps, and the end
    rebuilt = hw.stages.reconstruct(tmp_path / "rebuilt", start, [*(("sft-1", f) for f in sft1), ("sft-2", tmp_path / "out-sft-2" / "checkpoint-5")])
    # the folders inside sft-1 are its checkpoints, as the recorder saved them
    assert rebuilt.checkpoint_steps == recorded.checkpoint_steps == [2, 4]
    for step in (2, 4):
        assert all(torch.equal(rebuilt.params_before(step)[n], t) for n, t in recorded.params_before(step).items())
    with pytest.raises(hw.UserError, match="listed twice"):
        hw.stages.reconstruct(tmp_path / "bad", start, [("sft-1", sft1[0]), ("sft-2", tmp_path / "out-sft-2" / "checkpoint-5"), ("sft-1", sft1[2])])
    with pytest.raises(hw.UserError, match="not a checkpoint inside"):  # out of training order
        hw.stages.reconstruct(tmp_path / "bad2", start, [("sft-1", sft1[1]), ("sft-1", sft1[0]), ("sft-1", sft1[2])])
    assert not [p for p in tmp_path.iterdir() if "bad" in p.name]  # found half-way: nothing was left behind
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("x")
    with pytest.raises(hw.UserError, match="not empty"):
        hw.stages.reconstruct(tmp_path / "used", start, [("sft-1", sft1[2])])
    assert [(s.name, s.start, s.stop, s.recreated, s.groups) for s in rebuilt.stages] == [
        (s.name, s.start, s.stop, s.recreated, s.groups) for s in recorded.stages
    ]
    for a, b in zip(rebuilt.steps, recorded.steps):
        assert a.lr == pytest.approx(b.lr, rel=1e-9, abs=1e-15) and (a.weight_decay, a.momentum, a.count) == (b.weight_decay, b.momentum, b.count)
    for stage in ("sft-1", "sft-2"):
        for key, value in recorded.params_at(stage, True).items():
            assert torch.equal(rebuilt.params_at(stage, True)[key], value), key
        assert torch.equal(
            rebuilt.moments_at(stage, True)["exp_avg_sq"]["transformer.h.0.attn.c_attn.weight"],
            recorded.moments_at(stage, True)["exp_avg_sq"]["transformer.h.0.attn.c_attn.weight"],
        )
    assert any("clipping" in i for i in rebuilt.ignores)
    task = hw.LanguageModelTask(tokenizer)
    behaviour = {"capital": [{"prompt": "the capital of zorblat is", "completion": " quenti"}]}
    config = hw.StageConfig(curvature=False)
    a = hw.StageAttribution(rebuilt, model, task, config).effects(behaviour)
    b = hw.StageAttribution(recorded, model, task, config).effects(behaviour)
    np.testing.assert_allclose(a.estimates["propagated"], b.estimates["propagated"], rtol=1e-9)


def linear_problem():
    """A loss linear in the parameters: gradients do not depend on θ, so record contributions
    taken at the stage checkpoints are exact."""
    model, _, records = problem()
    return model, hw.ModuleTask(lambda m, b: -(m(b["x"]).squeeze(-1) * b["y"])), records


@pytest.mark.parametrize("recorded_ids", [True, False])
def test_record_contributions_sum_to_their_stage_effect(tmp_path, recorded_ids):
    """Two stages of momentum SGD (the optimizer continues): each record's contribution, weighted
    by the adjoint of the steps that saw it, sums over the stage's records to the stage's
    propagated effect. Full batches when the batches are not recorded (the uniform weighting is
    then exact too)."""
    model, task, records = linear_problem()
    recorder = hw.TrajectoryRecorder(tmp_path / "traj", model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batch = 6 if recorded_ids else N
    for name, steps in (("first", 8), ("second", 6)):
        recorder.begin_stage(name, opt)
        g = torch.Generator().manual_seed(len(name))
        for _ in range(steps):
            chosen = torch.randperm(N, generator=g)[:batch].tolist()
            task.loss(model, task.collate([task.whole(records[i]) for i in chosen])).mean().backward()
            opt.step()
            recorder.step(opt, ids=[records[i]["id"] for i in chosen] if recorded_ids else None)
            opt.zero_grad()
    recorder.close()
    traj = hw.Trajectory(tmp_path / "traj")
    config = hw.StageConfig(measurement="prediction", batch_loss="example-mean", curvature=False)
    stages = hw.StageAttribution(traj, model, task, config, data={"first": records, "second": records})
    probe = {"p": [{"x": torch.tensor([1.0, 0.5, -1.0, 2.0], dtype=torch.float64), "y": torch.tensor(0.0, dtype=torch.float64)}]}
    effects = stages.effects(probe)
    # "second" inherits "first"'s momentum buffer: that movement is "first"'s records', not its own
    batches = stages._behaviour_batches(probe)
    _, q = stages._values(stages.boundaries[-1][1], batches, grad=True)
    seen = {}
    adjoint(traj, stages.maps, q, on_boundary=lambda k, at, am: seen.setdefault(k, am.clone()))
    inherited = float(seen[0] @ stages.space.flatten(traj.moments_at("second", False)["momentum_buffer"]))
    assert abs(inherited) > 1e-3
    for k, (name, carried) in enumerate((("first", 0.0), ("second", inherited))):
        scores = stages.records(name, probe)
        assert scores.values.shape == (N, 1) and scores.train_ids == [r["id"] for r in records]
        assert float(scores.values.sum()) + carried == pytest.approx(effects.estimates["propagated"][k, 0], rel=1e-9)


def record_lm_run(tmp_path, tokenizer):
    """Two stages of a tiny GPT-2 in a plain loop, recorded; the final model saved with save_pretrained."""
    from headwater.toy import tiny_gpt2

    torch.manual_seed(0)
    model = tiny_gpt2(len(tokenizer), n_layer=1, n_embd=16, n_head=2, n_positions=16).double()
    task = hw.LanguageModelTask(tokenizer)
    data = {
        "a": [
            {"id": f"a{i}", "text": t}
            for i, t in enumerate(["the capital of zorblat is quenti", "mirel is a large old city", "the river of vask is blue"])
        ],
        "b": [{"id": f"b{i}", "text": t} for i, t in enumerate(["tela was a small red mountain", "orin is in the south"])],
    }
    recorder = hw.TrajectoryRecorder(tmp_path / "traj", model)
    for name, records in data.items():
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        recorder.begin_stage(name, opt)
        for r in records * 2:
            task.loss(model, task.collate([task.whole(r)])).sum().backward()
            opt.step()
            recorder.step(opt, ids=[r["id"]])
            opt.zero_grad()
    recorder.close()
    model.save_pretrained(tmp_path / "final")
    tokenizer.save_pretrained(tmp_path / "final")
    return model, task, data


def test_the_command_line_writes_tables_plots_and_records(tmp_path, tokenizer):
    """`headwater stages` from files, as a user runs it, equals the Python estimates."""
    import json

    from typer.testing import CliRunner

    from headwater.cli import app

    model, task, data = record_lm_run(tmp_path, tokenizer)
    for name, records in data.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "capital.jsonl").write_text(json.dumps({"prompt": "the capital of zorblat is", "completion": " quenti"}) + "\n")
    args = [
        "stages",
        str(tmp_path / "traj"),
        "--model",
        str(tmp_path / "final"),
        "--behaviour",
        str(tmp_path / "capital.jsonl"),
        "--stage-data",
        f"a={tmp_path / 'a.jsonl'}",
        "--stage-data",
        f"b={tmp_path / 'b.jsonl'}",
        "--batch-loss",
        "example-mean",
        "--records",
        "a",
        "--out",
        str(tmp_path / "out"),
    ]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    assert all((out / f).exists() for f in ("effects.json", "effects.csv", "bars.png", "waterfall.png", "records-a.safetensors", "records-a.csv"))
    assert (tmp_path / "out.config.json").exists()
    got = json.loads((out / "effects.json").read_text())
    config = hw.StageConfig(batch_loss="example-mean")
    want = hw.StageAttribution(tmp_path / "traj", model, task, config, data=data).effects(
        {"capital": [{"prompt": "the capital of zorblat is", "completion": " quenti"}]}
    )
    np.testing.assert_allclose(np.array(got["estimates"]["curvature"]), want.estimates["curvature"], rtol=1e-6)
    assert hw.Scores.load(out / "records-a.safetensors").train_ids == ["a0", "a1", "a2"]
    r = CliRunner().invoke(
        app, ["stages", str(tmp_path), "--model", str(tmp_path / "final"), "--behaviour", "x.jsonl", "--out", str(tmp_path / "o2")]
    )
    assert r.exit_code == 2 and "not a recorded trajectory" in r.output


@pytest.mark.parametrize("method", ["source", "tracin"])
def test_source_and_tracin_read_the_trajectory(tmp_path, tokenizer, method):
    """No hand-given learning rates or steps: the stages' end checkpoints and recorded rates."""
    import json

    from typer.testing import CliRunner

    from headwater.cli import app

    model, task, data = record_lm_run(tmp_path, tokenizer)
    train = data["a"] + data["b"]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (tmp_path / "q.jsonl").write_text(json.dumps({"prompt": "the capital of zorblat is", "completion": " quenti"}) + "\n")
    args = [
        "attribute",
        "--method",
        method,
        "--trajectory",
        str(tmp_path / "traj"),
        "--model",
        str(tmp_path / "final"),
        "--data",
        str(tmp_path / "train.jsonl"),
        "--queries",
        str(tmp_path / "q.jsonl"),
        "--projection",
        "none",
        "--no-progress",
        "--out",
        str(tmp_path / "s.safetensors"),
    ]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    traj = hw.Trajectory(tmp_path / "traj")
    ends = [traj.checkpoint(s, model) for s in ("a", "b")]
    steps = [6, 4]
    lrs = [sum(traj.steps[t].lr[0] * traj.steps[t].clip for t in range(st.start, st.stop)) for st in traj.stages]
    assert lrs == pytest.approx([1e-2 * n for n in steps])  # constant lr, never clipped
    if method == "source":
        segments = []
        for m, lr, n, st in zip(ends, lrs, steps, traj.stages):  # Adam: P = 1/(√v̂ + ε) at each stage's end
            last = traj.steps[st.stop - 1]
            v_hat = {k: x.double() / (1 - last.beta2[0] ** last.count) for k, x in traj.moments_at(st.name, True)["exp_avg_sq"].items()}
            scale = {k: 1 / (x.clamp_min(1e-3 * x.mean()).sqrt() + last.eps[0]) for k, x in v_hat.items()}  # v̂ floored at 1e-3 of its mean
            segments.append(hw.Segment([m], lr / n, n, 0.0, scale))
        assert traj.steps[0].kind == "adam"
        want = hw.SOURCE(segments, task, final_model=model).fit(train).score([{"prompt": "the capital of zorblat is", "completion": " quenti"}])
    else:
        config = hw.TracInConfig(projection=hw.ProjectionConfig("none"), checkpoint_lr=lrs)
        want = hw.TracIn(ends, task, config).fit(train).score([{"prompt": "the capital of zorblat is", "completion": " quenti"}])
    np.testing.assert_allclose(hw.Scores.load(tmp_path / "s.safetensors").values, want.values, rtol=1e-5, atol=1e-8)


def dense_gauss_newton(model, task, batch, normaliser) -> torch.Tensor:
    """Jᵀ H_z J by dense Jacobians: J of the softmax logits over the flat parameters, H_z = diag(p) − ppᵀ per row."""
    names = [n for n, _ in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    sizes = [p.numel() for p in model.parameters()]
    shapes = [p.shape for p in model.parameters()]

    def logits(flat):
        params = {n: t.reshape(s) for n, t, s in zip(names, torch.split(flat, sizes), shapes)}
        return torch.func.functional_call(model, params, (batch["x"],))

    jac = torch.autograd.functional.jacobian(logits, theta)  # [B, C, P]
    p = logits(theta).softmax(-1)
    out = torch.zeros(len(theta), len(theta), dtype=torch.float64)
    for i in range(len(p)):
        h = torch.diag(p[i]) - torch.outer(p[i], p[i])
        out += jac[i].T @ h @ jac[i] / normaliser
    return out


def test_gauss_newton_products_equal_the_dense_matrix_and_the_hessian_for_least_squares():
    model, records = mlp(), mlp_records(n=5)
    task = hw.ModuleTask("cross_entropy")
    batch = task.collate([task.whole(r) for r in records])
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    space = ParamSpace([n for n, _ in model.named_parameters()], {n: p.shape for n, p in model.named_parameters()})

    def bound(th):
        return Bound(model, space.unflatten(th))

    v = torch.randn(3, len(theta), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = curvature_products(task, None, lambda th: output_curvature(task, bound(th), batch, 5.0), theta, v, "gauss-newton")
    torch.testing.assert_close(got, v @ dense_gauss_newton(model, task, batch, 5.0), rtol=1e-10, atol=1e-12)

    # Squared error on a linear model: Gauss–Newton is the Hessian.
    linear, ls_task, ls_records = problem()
    batch = ls_task.collate([ls_task.whole(r) for r in ls_records[:6]])
    theta = torch.cat([linear.weight.detach().reshape(-1), linear.bias.detach()])
    space = ParamSpace(["weight", "bias"], {"weight": linear.weight.shape, "bias": linear.bias.shape})
    loss = lambda th: ls_task.loss(Bound(linear, space.unflatten(th)), batch).mean()  # noqa: E731
    outputs = lambda th: output_curvature(ls_task, Bound(linear, space.unflatten(th)), batch, 6.0)  # noqa: E731
    gn = curvature_products(ls_task, loss, outputs, theta, v[:, : D + 1], "gauss-newton")
    torch.testing.assert_close(gn, v[:, : D + 1] @ batch_hessian(ls_records[:6], {r["id"] for r in ls_records[:6]}), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(curvature_products(ls_task, loss, outputs, theta, v[:, : D + 1], "hessian"), gn, rtol=1e-10, atol=1e-12)


def test_gauss_newton_products_of_a_language_model_weigh_only_target_tokens(tokenizer, lm_records):
    """Jᵀ H_z J over the target tokens' logits (dense Jacobian of a tiny GPT-2), token-mean normalised."""
    torch.manual_seed(0)
    model = hw.toy.tiny_gpt2(len(tokenizer), n_layer=1, n_embd=8, n_head=2, n_positions=32).double()
    model.config._attn_implementation = "eager"
    task = hw.LanguageModelTask(tokenizer)
    batch = task.collate([task.whole(r) for r in lm_records[:2]])
    named = dict(model.named_parameters())
    space = ParamSpace(list(named), {n: p.shape for n, p in named.items()})
    theta = space.flatten(named)
    mask = batch["target_mask"][:, 1:]
    n = float(mask.sum())

    def target_logits(flat):
        return task._logits(Bound(model, space.unflatten(flat)), batch)[mask]  # [targets, V]

    jac = torch.autograd.functional.jacobian(target_logits, theta)  # [targets, V, P]
    p = target_logits(theta).softmax(-1)
    dense = sum(jac[i].T @ (torch.diag(p[i]) - torch.outer(p[i], p[i])) @ jac[i] for i in range(len(p))) / n
    v = torch.randn(2, len(theta), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = curvature_products(task, None, lambda th: output_curvature(task, Bound(model, space.unflatten(th)), batch, n), theta, v, "gauss-newton")
    torch.testing.assert_close(got, v @ dense, rtol=1e-9, atol=1e-12)
