"""Stage attribution against brute-force replays and retraining with a stage skipped.

Runs are real torch.optim runs recorded by `TrajectoryRecorder` on least squares (a linear model,
squared error): the update is affine in the parameters there, so the linearised propagation and
the curvature-aware estimator are exact and can be checked to round-off.
"""

import numpy as np
import pytest
import torch
from reference import mlp, mlp_records
from stage_runs import D, N, batch_hessian, make_optimizer, problem, retrain_without, run_stage

import headwater as hw
from headwater.stages.gauss_newton import curvature_products, output_curvature
from headwater.stages.propagation import ParamSpace, adjoint, forward
from headwater.training import Bound

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


def test_adams_preconditioner_floors_second_moments_that_stayed_at_zero(tmp_path):
    """A dead hidden unit (zero weights in and out, zero bias) never gets a gradient, so AdamW
    leaves its second moments at 0; the stage's preconditioner takes them at 10⁻³ of their
    tensor's mean, not 1/ε, and keeps every other coordinate's 1/(√v̂ + ε)."""
    model, task = mlp(d_in=5, hidden=6), hw.ModuleTask("cross_entropy")
    with torch.no_grad():
        model[0].weight[2], model[0].bias[2], model[2].weight[:, 2] = 0, 0, 0
    records = [{"id": f"r{i}", **r} for i, r in enumerate(mlp_records(n=12, d_in=5))]
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.0, eps=1e-8)
    recorder = hw.TrajectoryRecorder(tmp_path / "traj", model)
    batches = [records[i : i + 4] for i in range(0, 12, 4)]
    recorder.begin_stage("only", opt)
    for batch in batches:
        task.loss(model, task.collate([task.whole(r) for r in batch])).mean().backward()
        opt.step()
        recorder.step(opt, ids=[r["id"] for r in batch])
        opt.zero_grad()
    recorder.close()
    traj = hw.Trajectory(tmp_path / "traj")
    got = ParamSpace(traj.params, {n: p.shape for n, p in model.named_parameters()}).unflatten(
        hw.StageAttribution(traj, model, task, hw.StageConfig(batch_loss="example-mean"))._preconditioners()["only"]
    )
    for name, v in traj.moments_at("only", True)["exp_avg_sq"].items():
        v_hat = v.double() / (1 - 0.999**3)
        want = 1 / (torch.maximum(v_hat, 1e-3 * v_hat.mean()).sqrt() + 1e-8)
        np.testing.assert_allclose(got[name], want, rtol=1e-12)
    assert float(traj.moments_at("only", True)["exp_avg_sq"]["0.bias"][2]) == 0  # the dead unit's
    assert float(got["0.bias"][2]) < 1e-3 / 1e-8  # far from 1/ε


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
    the stage boundaries saved, the interpolated path is an approximation that shows, and
    replaying the stages over their recorded batches recovers the run's own path."""
    fraction = 1e-5
    behaviour = {"probe": [{"x": torch.linspace(-1, 1, 5, dtype=torch.float64), "y": 2}]}
    errors, estimates, runs = {}, {}, {}
    for every, curvature_path in ((1, "interpolated"), (None, "interpolated"), (None, "replayed")):
        path = tmp_path / f"every-{every}"
        if every not in runs:
            runs[every] = nonlinear_run(path, every)
        model, task, data = runs[every]
        traj = hw.Trajectory(path)
        assert traj.checkpoint_steps == (list(range(1, 37)) if every else [])
        config = hw.StageConfig(
            batch_loss="example-mean", removed=fraction, readout="linear", curvature_matrix="hessian", curvature_path=curvature_path
        )
        effects = hw.StageAttribution(traj, model, task, config, data=data).effects(behaviour)
        assert not any("replayed path" in note for note in effects.ignores)
        probe = task.collate([task.whole(r) for r in behaviour["probe"]])
        truth = np.array([effects.final[0] - float(task.loss(replay_with_less_of(traj, k, fraction, data), probe).mean().detach()) for k in range(2)])
        key = (every, curvature_path)
        estimates[key] = effects.estimates["curvature (linear)"][:2, 0]
        errors[key] = np.abs(estimates[key] - truth).max() / np.abs(truth).max()
        naive_error = np.abs(effects.estimates["naive (linear)"][:2, 0] - truth).max() / np.abs(truth).max()
        assert naive_error > 0.05  # later steps do change the gap: the test can tell estimators apart
    assert errors[1, "interpolated"] < 1e-3
    assert errors[None, "interpolated"] > 10 * errors[1, "interpolated"]
    np.testing.assert_allclose(estimates[None, "replayed"], estimates[1, "interpolated"], rtol=1e-8)


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
