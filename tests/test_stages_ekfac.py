"""The at-scale curvature estimator (`curvature_matrix="ekfac"`): each later stage crossed in its
EK-FAC eigenbasis.

On full-batch least squares with one output every step's Hessian is the same Kronecker product,
2·E[x̃x̃ᵀ] ⊗ [1], so with that curvature the eigenbasis crossing is exact and must equal retraining
with the stage skipped; a fitted EK-FAC (sampled Fisher) must come close to it.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch
from reference import mlp, mlp_records
from stage_runs import N, batch_hessian, make_optimizer, problem, retrain_without, run_stage

import headwater as hw
from headwater.collect import tracked_modules
from headwater.curvature import Curvature, ModuleCurvature
from headwater.stages.eigenbasis import StageEigenbasis
from headwater.stages.gauss_newton import curvature_products
from headwater.stages.propagation import ParamSpace, StepMap, forward
from headwater.stages.replay import StageReplay

STAGES = ["pre", "mid", "tune", "late"]
PROBES = [
    {"x": torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64), "y": torch.tensor(0.0, dtype=torch.float64)},
    {"x": torch.tensor([0.0, 1.0, 1.0, -1.0], dtype=torch.float64), "y": torch.tensor(0.0, dtype=torch.float64)},
]


def sgdw(model, lr):
    from stage_runs import SGDW

    return SGDW([{"params": list(model.parameters()), "weight_decay": 0.05}], lr=lr, momentum=0.9)


def full_batch_run(path, persist: bool):
    """Four full-batch stages, one parameter group each (the basis gives a module's bias its
    weight's decay): momentum SGD with coupled L2, continued with new settings when `persist`;
    a fresh momentum SGD on warm-up + cosine with clipping; SGDW."""
    model, task, records = problem()
    recorder = hw.TrajectoryRecorder(path, model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.05)
    run_stage(recorder, model, task, records, opt, 6, "pre", batch=N)
    if persist:
        for group in opt.param_groups:
            group["momentum"], group["lr"] = 0.5, 0.05
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5, weight_decay=0.05)
    run_stage(recorder, model, task, records, opt, 5, "mid", batch=N)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.05)
    run_stage(recorder, model, task, records, opt, 7, "tune", batch=N, clip=0.5, sched="cosine")
    run_stage(recorder, model, task, records, sgdw(model, 0.1), 5, "late", batch=N)
    return model, task, records


def exact_curvature(model, records) -> Curvature:
    """The Hessian of one example's squared error, averaged, as a Kronecker block: 2 ⊗ E[x̃x̃ᵀ]."""
    x = torch.stack([torch.cat([r["x"], torch.ones(1, dtype=torch.float64)]) for r in records])
    lam_a, q_a = torch.linalg.eigh(x.T @ x / len(x))
    (name,) = tracked_modules(model)
    one = torch.ones(1, 1, dtype=torch.float64)
    block = ModuleCurvature(q_a, lam_a, one, 2 * one[0], torch.outer(2 * one[0], lam_a))
    return Curvature({name: block}, hw.CurvatureConfig())


@pytest.mark.parametrize("persist", [True, False])
def test_the_eigenbasis_crossing_equals_retraining_with_the_stage_skipped(tmp_path, persist):
    model, task, records = full_batch_run(tmp_path / "traj", persist)
    traj = hw.Trajectory(tmp_path / "traj")
    assert [s.recreated for s in traj.stages] == [True, not persist, True, True]
    config = hw.StageConfig(measurement="prediction", batch_loss="example-mean", curvature_matrix="ekfac")
    curvatures = {s: exact_curvature(model, records) for s in STAGES}
    effects = hw.StageAttribution(traj, model, task, config, curvatures=curvatures).effects({"a": PROBES[:1], "b": PROBES[1:]})
    truth = np.zeros((len(STAGES), 2))
    for k in range(len(STAGES)):
        skipped = retrain_without(traj, k, records)
        with torch.no_grad():
            truth[k] = effects.final - np.array([float(skipped(p["x"][None]).squeeze()) for p in PROBES])
    np.testing.assert_allclose(effects.estimates["curvature"], truth, rtol=1e-8, atol=1e-10)
    assert not np.allclose(effects.estimates["propagated"], truth, rtol=1e-3)  # the curvature is what makes it exact


def dense_corrected_effects(traj, att, fits, hessian) -> torch.Tensor:
    """Reference for the corrected crossing, [stages, probes]: each stage's curvature as the dense
    matrix C_basis + V (VᵀHV − VᵀC_basis V) Vᵀ, V an orthonormal basis of the gaps entering the
    stage and their products with the exact Hessian H, applied at every step."""
    flat, gaps = att.space.flatten, []
    for s in traj.stages:
        moments = [flat(traj.moments_at(s.name, end).get("momentum_buffer", {})) for end in (False, True)]
        gaps.append((flat(traj.params_at(s.name, True)) - flat(traj.params_at(s.name, False)), moments[1] - moments[0]))
    for j, stage in enumerate(traj.stages[1:], 1):
        if stage.recreated:
            gaps[:j] = [(d, torch.zeros_like(m)) for d, m in gaps[:j]]
        entering = torch.stack([v for d, m in gaps[:j] for v in (d, m) if v.any()])
        _, sv, vh = torch.linalg.svd(torch.cat([entering, entering @ hessian]), full_matrices=False)
        v = vh[sv > 1e-10 * sv.max()]
        (block,) = fits[stage.name].modules.values()
        basis = block.q_a @ torch.diag(block.corrected[0]) @ block.q_a.T  # one output: Q_S = [1]
        curvature = basis + v.T @ (v @ hessian @ v.T - v @ basis @ v.T) @ v
        for t in range(stage.start, stage.stop):
            gaps[:j] = [forward(att.maps[t], d, m, curvature @ d) for d, m in gaps[:j]]
    probes = torch.stack([torch.cat([p["x"], torch.ones(1, dtype=torch.float64)]) for p in PROBES])
    return torch.stack([probes @ d for d, _ in gaps])


def test_a_fitted_ekfac_comes_close_and_its_subspace_correction_is_exact_there(tmp_path):
    """The sampled Fisher of least squares is the Hessian in expectation: fitted on the stages'
    records, the eigenbasis estimate is near the exact one, nearer than first-order propagation.
    Given the records, each stage's curvature is also made exact on the span of the gaps entering
    it (and their products): that equals a dense reference, and is nearer still."""
    model, task, records = full_batch_run(tmp_path / "traj", persist=True)
    traj = hw.Trajectory(tmp_path / "traj")
    behaviours = {"a": PROBES[:1], "b": PROBES[1:]}
    data = {s: records for s in STAGES}
    exact = hw.StageAttribution(traj, model, task, hw.StageConfig(measurement="prediction", batch_loss="example-mean"), data).effects(behaviours)
    config = hw.StageConfig(measurement="prediction", batch_loss="example-mean", curvature_matrix="ekfac", hvp_examples=N)
    fits = {
        s.name: hw.fit_curvature([traj.checkpoint(s.name, model, end) for end in (False, True)], task, records * 20, progress=False)
        for s in traj.stages
    }
    fitted = hw.StageAttribution(traj, model, task, config, curvatures=fits).effects(behaviours).estimates["curvature"]
    err = np.abs(fitted - exact.estimates["curvature"]).max()
    first_order = np.abs(exact.estimates["propagated"] - exact.estimates["curvature"]).max()
    assert err < 0.03 * first_order, (err, first_order)
    att = hw.StageAttribution(traj, model, task, config, data, curvatures=fits)
    corrected = att.effects(behaviours).estimates["curvature"]
    hessian = batch_hessian(records, {r["id"] for r in records})
    np.testing.assert_allclose(corrected, dense_corrected_effects(traj, att, fits, hessian), rtol=1e-9, atol=1e-12)
    assert np.abs(corrected - exact.estimates["curvature"]).max() < 0.1 * err


class Layouts(torch.nn.Module):
    """One module of each layout a basis maps: Linear, HF Conv1D (weight stored transposed), a
    Conv2d kept as a whole block, and an untracked LayerNorm."""

    def __init__(self):
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.lin, self.norm, self.conv1d = torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), Conv1D(2, 4)
        self.conv = torch.nn.Conv2d(2, 2, 2, bias=False)


def random_blocks(modules) -> dict:
    torch.manual_seed(0)
    blocks = {}
    for name, tm in modules.items():
        q_a = torch.linalg.qr(torch.randn(tm.d_in_aug, tm.d_in_aug, dtype=torch.float64))[0]
        q_s = torch.linalg.qr(torch.randn(tm.d_out, tm.d_out, dtype=torch.float64))[0]
        lam = torch.rand(tm.d_out, tm.d_in_aug, dtype=torch.float64)
        n = tm.d_out * tm.d_in_aug
        block = (torch.rand(n, dtype=torch.float64), torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))[0]) if name == "conv" else None
        blocks[name] = ModuleCurvature(q_a, torch.ones(tm.d_in_aug), q_s, torch.ones(tm.d_out), lam, block)
    return blocks


def test_the_basis_rotates_tracked_modules_and_crosses_sgd_steps_elementwise():
    """Products equal each module's dense block (Kronecker, or a whole block in that basis) on its
    [W | b] matrix, whatever the weight's layout; untracked parameters are left alone; an SGD stage
    crossed elementwise in the basis equals stepping with the products; a module's bias takes its
    weight's settings there."""
    model = Layouts().double()
    params = dict(model.named_parameters())
    space = ParamSpace(list(params), {n: p.shape for n, p in params.items()})
    modules = tracked_modules(model)
    assert set(modules) == {"lin", "conv1d", "conv"} and modules["conv1d"].transposed
    blocks = random_blocks(modules)
    basis = StageEigenbasis(Curvature(blocks, hw.CurvatureConfig()), modules, space, scale=0.5)
    v = torch.randn(3, space.size, dtype=torch.float64)
    np.testing.assert_allclose(basis.unrotate(basis.rotate(v)), v, atol=1e-12)
    rotated, plain = space.unflatten(basis.rotate(v)[0]), space.unflatten(v[0])
    assert torch.equal(rotated["norm.weight"], plain["norm.weight"]) and not torch.allclose(rotated["lin.weight"], plain["lin.weight"])
    out, given = space.unflatten(basis.products(v[:1])[0]), space.unflatten(v[0])
    assert float(out["norm.weight"].abs().max()) == 0 and float(given["norm.weight"].abs().max()) > 0  # untracked: no curvature
    for name, tm in modules.items():
        block = blocks[name]
        q = torch.kron(block.q_s, block.q_a)
        inner = block.block[1] @ torch.diag(block.block[0]) @ block.block[1].T if block.block is not None else torch.diag(block.corrected.reshape(-1))
        dense = 0.5 * q @ inner @ q.T
        matrix = lambda tensors: torch.cat(  # noqa: E731
            [tm.weight_matrix(tensors[tm.weight_name]), *([tensors[tm.bias_name][:, None]] if tm.has_bias else [])], 1
        )
        np.testing.assert_allclose(matrix(out), (dense @ matrix(given).reshape(-1)).reshape(tm.d_out, tm.d_in_aug), atol=1e-12)
    # an SGD stage crossed elementwise in the basis equals crossing it step by step with C's products
    groups = [list(params)]
    maps = [
        StepMap(
            "sgd",
            *(space.per_group(groups, [x]) for x in (0.1, 0.01, 1 - 0.1 * 0.02, 0.9, 0.0)),
            space.per_group(groups, [0.0]).bool(),
            clip,
            t == 0,
            1.0,
            None,
        )
        for t, clip in enumerate([1.0, 0.7, 0.5])
    ]
    d, m = torch.randn(2, 3, space.size, dtype=torch.float64)  # three gaps crossing together
    stepwise = (d, m)
    for step in maps:
        stepwise = forward(step, *stepwise, basis.products(stepwise[0]))
    for got, want in zip(basis.carry(maps, d, m), stepwise):
        np.testing.assert_allclose(got, want, atol=1e-12)
    # settings per group: in the basis a bias takes its weight's (no copy when they agree)
    decay = space.per_group([["lin.weight", "conv1d.weight", "conv.weight"], ["lin.bias", "conv1d.bias", "norm.weight", "norm.bias"]], [0.3, 0.7])
    per_module = space.unflatten(basis.step_map(replace(maps[0], decay=decay)).decay)
    assert float(per_module["lin.bias"].max()) == 0.3 and float(per_module["norm.bias"].min()) == 0.7
    assert basis.step_map(maps[0]).decay is maps[0].decay


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_ekfac_stage_effects_on_an_mlp_track_the_per_step_estimator(tmp_path, optimizer):
    """On a classifier trained in three stages (SGD or AdamW), the eigenbasis estimate follows per-step
    Gauss–Newton products (KFAC drops the blocks between layers, so not to round-off), and the
    config round-trips its nested fit settings."""
    torch.manual_seed(0)
    model = mlp(d_in=5, hidden=12)
    task = hw.ModuleTask("cross_entropy")
    data = {name: [{"id": f"{name}{i}", **r} for i, r in enumerate(mlp_records(40, d_in=5, seed=s))] for s, name in enumerate(["a", "b", "c"])}
    recorder = hw.TrajectoryRecorder(tmp_path / "traj", model)
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    else:  # Adam stages are crossed in parameter space
        opt = torch.optim.AdamW(model.parameters(), lr=0.005, weight_decay=0.01)
    for name, records in data.items():
        recorder.begin_stage(name, opt)
        g = torch.Generator().manual_seed(len(name))
        for _ in range(12):
            chosen = torch.randperm(len(records), generator=g)[:10].tolist()
            task.loss(model, task.collate([task.whole(records[i]) for i in chosen])).mean().backward()
            opt.step()
            recorder.step(opt, ids=[records[i]["id"] for i in chosen])
            opt.zero_grad()
        recorder.end_stage()
    behaviours = {"x": mlp_records(6, d_in=5, seed=9)[:3], "y": mlp_records(6, d_in=5, seed=9)[3:]}
    base = dict(measurement="loss", batch_loss="example-mean", readout="linear")
    per_step = hw.StageAttribution(tmp_path / "traj", model, task, hw.StageConfig(**base), data).effects(behaviours)
    config = hw.StageConfig(**base, curvature_matrix="ekfac", ekfac=hw.CurvatureConfig(fisher="exact"))
    assert hw.StageConfig.from_dict(config.to_dict()) == config
    at_scale = hw.StageAttribution(tmp_path / "traj", model, task, config, data).effects(behaviours)
    a, b, c = (
        e.estimates[k][:-1].ravel()
        for e, k in ((at_scale, "curvature (linear)"), (per_step, "curvature (linear)"), (per_step, "propagated (linear)"))
    )
    # (the last stage has nothing after it to cross)
    assert np.corrcoef(a, b)[0, 1] > 0.95, (a, b)
    assert np.abs(a - b).max() < 0.2 * np.abs(c - b).max(), (a, b, c)  # far nearer than leaving the curvature out


def test_record_contributions_through_the_eigenbasis_equal_the_per_step_ones(tmp_path):
    """With the exact curvature, a stage's records resolved through the later stages' eigenbases
    (each corrected on the adjoint's span) equal those resolved with a Hessian product per step."""
    model, task, records = full_batch_run(tmp_path / "traj", persist=True)
    traj = hw.Trajectory(tmp_path / "traj")
    data = {s: records for s in STAGES}
    base = dict(measurement="prediction", batch_loss="example-mean", hvp_examples=N)
    per_step = hw.StageAttribution(traj, model, task, hw.StageConfig(**base), data).records("mid", {"a": PROBES}, curvature=True)
    curvatures = {s: exact_curvature(model, records) for s in STAGES}
    config = hw.StageConfig(**base, curvature_matrix="ekfac")
    at_scale = hw.StageAttribution(traj, model, task, config, data, curvatures=curvatures).records("mid", {"a": PROBES}, curvature=True)
    first_order = hw.StageAttribution(traj, model, task, hw.StageConfig(**base), data).records("mid", {"a": PROBES})
    np.testing.assert_allclose(at_scale.values, per_step.values, rtol=1e-9, atol=1e-12)
    assert not np.allclose(first_order.values, per_step.values, rtol=1e-3)


def test_a_token_mean_runs_basis_has_the_gauss_newton_trace_of_its_batch_loss(tokenizer, lm_records):
    """A token-mean run divides its batch loss by the batch's targets, and EK-FAC is fitted per
    example (each record's summed loss): scaled by examples / targets, a module's eigenvalues sum to
    the trace of that module's Gauss–Newton block of the token-mean loss (the EK-FAC diagonal is
    exact in expectation; the sampled Fisher's noise is the tolerance)."""
    from headwater.stages.gauss_newton import output_curvature
    from headwater.stages.later_curvature import targets_per_example
    from headwater.training import Bound

    torch.manual_seed(0)
    model = hw.toy.tiny_gpt2(len(tokenizer), n_layer=1, n_embd=8, n_head=2, n_positions=32).double()
    model.config._attn_implementation = "eager"
    task = hw.LanguageModelTask(tokenizer)
    fit = hw.fit_curvature(model, task, lm_records * 200, modules=["transformer.h.0.mlp.c_proj"], progress=False)
    scale = 1 / targets_per_example(task, lm_records)
    assert scale < 0.5  # several targets per record: a missing scale would show
    params = dict(model.named_parameters())
    space = ParamSpace(list(params), {n: p.shape for n, p in params.items()})
    batch = task.collate([task.whole(r) for r in lm_records])
    targets = float(batch["target_mask"][:, 1:].sum())
    theta = space.flatten(params)
    offsets = dict(zip(space.names, np.cumsum([0, *space.sizes[:-1]])))
    rows = [offsets[n] + i for n in ("transformer.h.0.mlp.c_proj.weight", "transformer.h.0.mlp.c_proj.bias") for i in range(params[n].numel())]
    units = torch.eye(space.size, dtype=torch.float64)[rows]
    products = curvature_products(
        task, None, lambda th: output_curvature(task, Bound(model, space.unflatten(th)), batch, targets), theta, units, "gauss-newton"
    )
    exact_trace = float(products[torch.arange(len(rows)), rows].sum())
    basis = StageEigenbasis(fit, tracked_modules(model, ["transformer.h.0.mlp.c_proj"]), space, scale)
    np.testing.assert_allclose(float(basis.eigenvalues.sum()), exact_trace, rtol=0.1)


def test_the_adjoints_correction_alone_recovers_the_per_step_records_when_its_span_is_whole(tmp_path):
    """With a basis that holds no curvature at all (Λ = 0), a stage's records resolved through
    the later stages rest on the correction alone: on the span of the adjoint vectors entering
    each stage and their products, which for three behaviours of a 5-parameter model is the whole
    space, so they equal the per-step Hessian records."""
    model, task, records = full_batch_run(tmp_path / "traj", persist=True)
    traj = hw.Trajectory(tmp_path / "traj")
    data = {s: records for s in STAGES}
    probes = {
        "a": PROBES[:1],
        "b": PROBES[1:],
        "c": [{"x": torch.tensor([2.0, 0.5, -1.0, 0.0], dtype=torch.float64), "y": torch.tensor(0.0, dtype=torch.float64)}],
    }
    base = dict(measurement="prediction", batch_loss="example-mean", hvp_examples=N)
    per_step = hw.StageAttribution(traj, model, task, hw.StageConfig(**base), data).records("pre", probes, curvature=True)
    empty = exact_curvature(model, records)
    for block in empty.modules.values():
        block.corrected = torch.zeros_like(block.corrected)
    config = hw.StageConfig(**base, curvature_matrix="ekfac")
    corrected = hw.StageAttribution(traj, model, task, config, data, curvatures={s: empty for s in STAGES}).records("pre", probes, curvature=True)
    uncorrected = hw.StageAttribution(traj, model, task, config, curvatures={s: empty for s in STAGES}, data={"pre": records}).records(
        "pre", probes, curvature=True
    )
    np.testing.assert_allclose(corrected.values, per_step.values, rtol=1e-8, atol=1e-10)
    assert not np.allclose(uncorrected.values, per_step.values, rtol=1e-3)  # without the later stages' records: no correction


def adam_run(path):
    """Three mini-batch AdamW stages of least squares (per-group decay): "a", then "b" continuing
    its optimizer (moments and step count) at a new rate, then "c" with a fresh one."""
    model, task, records = problem()
    recorder = hw.TrajectoryRecorder(path, model)
    opt = make_optimizer("adamw", model, lr=0.5)
    run_stage(recorder, model, task, records, opt, 6, "a", seed=1)
    for group in opt.param_groups:
        group["lr"] = 0.02
    run_stage(recorder, model, task, records, opt, 5, "b", seed=2)
    run_stage(recorder, model, task, records, make_optimizer("adamw", model, lr=0.3), 6, "c", sched="cosine", seed=3)
    return model, task, records


def adam_replay_with_less_of(traj, k: int, fraction: float, model, task, records) -> dict:
    """The run with `fraction` of stage k taken out (its end parameters and both Adam moments moved
    that far back to its start), the later stages replayed as torch.optim ran them (StageReplay)."""
    stage = traj.stages[k]
    moved = lambda end, start: {n: end[n] - fraction * (end[n] - start.get(n, 0 * end[n])) for n in end}  # noqa: E731
    p = moved(traj.params_at(stage.name, True), traj.params_at(stage.name, False))
    ends, starts = traj.moments_at(stage.name, True), traj.moments_at(stage.name, False)
    m, v = (moved(ends[key], starts.get(key, {})) for key in ("exp_avg", "exp_avg_sq"))
    for later in traj.stages[k + 1 :]:
        replay = StageReplay(traj, later.name, model, task, records, "example-mean")
        s = replay.initial_state()
        for n in replay.names:
            s[f"p.{n}"] = p[n]
            if not later.recreated:
                s[f"m.{n}"], s[f"v.{n}"] = m[n], v[n]
        for t in range(later.stop - later.start):
            s = replay.step(s, t, replay.weights_for(replay.ones(), t))
        p, m, v = ({n: s[f"{x}.{n}"] for n in replay.names} for x in "pmv")
    return p


def test_replayed_adam_stages_carry_the_second_moments_response(tmp_path):
    """Taking 10⁻⁶ of a stage out of an AdamW run (optimizer continued, then re-created): with the
    replayed path each later Adam step takes its own moments and its second moment's response to
    the gap, and the curvature estimate equals retraining to first order; with the stage-end
    preconditioner and no second-moment gap it does not."""
    fraction = 1e-6
    model, task, records = adam_run(tmp_path / "traj")
    traj = hw.Trajectory(tmp_path / "traj")
    assert [s.recreated for s in traj.stages] == [True, False, True]
    final = np.array([float(model(p["x"][None]).squeeze()) for p in PROBES])
    truth = np.zeros((3, 2))
    for k in range(3):
        p = adam_replay_with_less_of(traj, k, fraction, model, task, records)
        truth[k] = final - np.array([float(pr["x"] @ p["weight"][0] + p["bias"][0]) for pr in PROBES])
    errors = {}
    for path in ("replayed", "interpolated"):
        config = hw.StageConfig(
            measurement="prediction", batch_loss="example-mean", curvature_matrix="hessian", curvature_path=path, removed=fraction
        )
        est = hw.StageAttribution(traj, model, task, config, {s.name: records for s in traj.stages}).effects({"a": PROBES[:1], "b": PROBES[1:]})
        errors[path] = np.abs(est.estimates["curvature (linear)"] - truth).max() / np.abs(truth).max()
    assert errors["replayed"] < 1e-4, errors
    assert errors["interpolated"] > 1e-2, errors
