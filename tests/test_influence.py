"""Influence functions against leave-one-out retraining and dense linear algebra."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import per_example_grads

import headwater as hw
from headwater.collect import GradientCollector
from headwater.config import CurvatureConfig, InfluenceConfig, ProjectionConfig
from headwater.curvature import curvature_batches, fisher_loss, fit_curvature
from headwater.methods.influence import EKFAC, KFAC, dense_gauss_newton, record_gradients
from headwater.task import ModuleTask


def logistic_data(n=60, d=4, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, classes, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.multinomial((x @ w).softmax(1), 1, generator=g).squeeze(1)  # noisy labels
    return [{"x": x[i], "y": int(y[i])} for i in range(n)]


def fit_logistic(model, records, weights, reg):
    """argmin (1/N) Σ w_i CE_i + reg/2 ||θ||², to machine precision (LBFGS, float64)."""
    x = torch.stack([r["x"] for r in records])
    y = torch.tensor([r["y"] for r in records])
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (weights * F.cross_entropy(model(x), y, reduction="none")).sum() / len(records)
        loss = loss + reg / 2 * sum((p**2).sum() for p in model.parameters())
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    return model


def test_dense_influence_matches_leave_one_out_retraining():
    records = logistic_data()
    queries = logistic_data(n=4, seed=1)
    reg = 1e-2
    torch.manual_seed(0)
    model = fit_logistic(torch.nn.Linear(4, 3).double(), records, torch.ones(len(records), dtype=torch.float64), reg)
    task = ModuleTask()
    G = dense_gauss_newton(model, task, records)
    config = InfluenceConfig(damping=reg, damping_mode="absolute")
    scores = EKFAC(model, task, config, curvature=G).fit(records).score(queries).values  # [n, q]

    qx = torch.stack([q["x"] for q in queries])
    qy = torch.tensor([q["y"] for q in queries])
    query_loss = lambda m: F.cross_entropy(m(qx), qy, reduction="none").detach()
    base = query_loss(model)
    actual = np.zeros_like(scores)
    for i in range(len(records)):
        w = torch.ones(len(records), dtype=torch.float64)
        w[i] = 0
        m = torch.nn.Linear(4, 3).double()
        m.load_state_dict(model.state_dict())  # warm start at the optimum
        actual[i] = (query_loss(fit_logistic(m, records, w, reg)) - base).numpy()
    for q in range(len(queries)):  # removing a helpful example raises the query loss
        r = np.corrcoef(scores[:, q], actual[:, q])[0, 1]
        assert r >= 0.99, (q, r)


def classifier(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


@pytest.mark.parametrize("mode", ["relative", "model"])
def test_cg_refinement_converges_to_the_full_damped_solve(mode):
    records = logistic_data(n=40)
    model, task = classifier().double(), ModuleTask()
    curvature = CurvatureConfig(fisher="true", batch_size=8, seed=4)
    curv = fit_curvature(model, task, records, config=curvature, progress=False)
    queries = logistic_data(n=3, seed=2)
    # Dense full Fisher of the same sample (same sampled labels), with each module's damping or one
    # for the whole model: EK-FAC's eigenvalues are the diagonal of the Fisher's blocks in a rotated
    # basis, so their mean over every module is the dense matrix's mean diagonal.
    col = GradientCollector(model, task, ProjectionConfig("none"))
    batches = curvature_batches(task, records, curvature)
    rows = torch.cat([col(b, fisher_loss(task, curvature, i)) for i, b in enumerate(batches)]).double()
    Fd = rows.T @ rows / rows.shape[0]
    if mode == "model":
        damp = torch.full((len(Fd),), 0.1 * float(Fd.diagonal().mean()), dtype=torch.float64)
    else:
        damp = torch.cat([torch.full((b - a,), curv.damping_for(n, 0.1)) for n, (a, b) in col.segments.items()]).double()
    errors = []
    for steps in (0, 3, 80):  # condition number ~400: PCG needs ~80 steps to reach the float floor
        inf = EKFAC(model, task, InfluenceConfig(curvature=curvature, damping=0.1, damping_mode=mode, cg_steps=steps), curvature=curv).fit(records)
        g = record_gradients(inf.collector, queries, hw.Loss())
        flat = lambda d: torch.cat([t.reshape(t.shape[0], -1) for t in d.values()], 1).double()
        want = torch.linalg.solve(Fd + torch.diag(damp), flat(g).T).T
        got = flat(inf.preconditioned_queries(queries, hw.Loss()))
        errors.append(((got - want).norm() / want.norm()).item())
    assert errors[1] < errors[0]
    assert errors[2] < 1e-4, errors
    # a solve made elsewhere (here the dense one) scores through score_solution: its dot products
    # with each training record's gradient
    shapes = {n: t.shape[1:] for n, t in g.items()}
    sizes = [int(np.prod(sh)) for sh in shapes.values()]
    solution = {n: part.reshape(-1, *shapes[n]) for n, part in zip(shapes, want.split(sizes, dim=1))}
    train = per_example_grads(model, task, [task.whole(r) for r in records])
    expected = flat(train) @ want.T
    got = inf.score_solution(queries, solution).values
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("rank", [None, 9, 1])
def test_streaming_scores_equal_dense_dot_products(rank):
    """Streaming (optionally with rank-r queries) equals dense dot products of per-example
    gradients with the preconditioned queries, truncated to rank r per module by an SVD."""
    records = logistic_data(n=20)
    model, task = classifier().double(), ModuleTask()
    curv = fit_curvature(model, task, records, config=CurvatureConfig(batch_size=8), progress=False)
    queries = logistic_data(n=3, seed=3)
    inf = EKFAC(model, task, InfluenceConfig(query_rank=rank, batch_size=7), curvature=curv).fit(records)
    h = inf.preconditioned_queries(queries, hw.Loss())
    train = per_example_grads(model, task, [task.whole(r) for r in records])
    if rank is not None:  # the best rank-r approximation of each query direction, independently
        h = {n: torch.stack([truncate(m, rank) for m in h[n]]) for n in h}
    want = sum(torch.einsum("noi,qoi->nq", train[n], h[n]) for n in h).numpy()
    got = inf.score(queries, dtype=np.float64).values
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())


def truncate(m: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = np.linalg.svd(m.numpy(), full_matrices=False)
    return torch.from_numpy((u[:, :r] * s[:r]) @ vh[:r])


def test_custom_measurement_equals_autograd_preconditioned_by_hand():
    """EK-FAC with the margin (log-odds) as the measurement: the autograd gradient of −margin per
    query, times the dense inverse (Q_S⊗Q_A)(Λ*+λ)⁻¹(Q_S⊗Q_A)ᵀ, dotted with each training gradient."""
    records, queries = logistic_data(n=24), logistic_data(n=3, seed=5)
    model, task = classifier().double(), ModuleTask()
    config = InfluenceConfig(curvature=CurvatureConfig(batch_size=8, seed=2), damping=0.1)
    inf = EKFAC(model, task, config).fit(records)
    got = inf.score(queries, hw.LogOdds(), dtype=np.float64)
    assert got.measurement == {"name": "log-odds", "direction": "up"}
    objective = lambda m, b: -task.log_odds(m, b)
    q = per_example_grads(model, task, [task.whole(r) for r in queries], loss=objective)
    train = per_example_grads(model, task, [task.whole(r) for r in records])
    want = 0
    for name, m in inf.curvature.modules.items():
        basis = torch.kron(m.q_s, m.q_a)
        lam = 0.1 * m.corrected.mean()
        inverse = basis @ torch.diag(1 / (m.corrected.reshape(-1) + lam)) @ basis.T
        want = want + train[name].flatten(1) @ inverse @ q[name].flatten(1).T
    np.testing.assert_allclose(got.values, want.numpy(), rtol=1e-9, atol=1e-12 * float(want.abs().max()))


@pytest.mark.parametrize("method", [EKFAC, KFAC])
def test_index_influence_equals_streaming_scores(tmp_path, method):
    """Through an index (projection none) the scores are the streamed influence scores; the
    curvature is fitted once and saved beside the index."""
    records = [{"x": r["x"].tolist(), "y": r["y"]} for r in logistic_data(n=24)]
    queries = [{"x": r["x"].tolist(), "y": r["y"]} for r in logistic_data(n=3, seed=9)]
    model, task = classifier().float(), ModuleTask()
    build = hw.BuildConfig(projection=ProjectionConfig("none"), storage_dtype="float32")
    index = hw.build_index(tmp_path / "idx", model, records, task=task, config=build, progress=False)
    config = InfluenceConfig(curvature=CurvatureConfig(seed=1, batch_size=8))
    got = method(model, task, config).fit(index).score(queries).values
    assert len(list(tmp_path.glob("idx/curvature-*.safetensors"))) == 1
    streamed = method(model, task, config).fit(records)
    want = streamed.score(queries).values
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    # streamed KFAC fits no eigenvalue correction (a pass it would not use); the index's serves both
    assert all((m.corrected is None) == (method is KFAC) for m in streamed.curvature.modules.values())
    top = hw.query(index, queries, method(model, task, config), top_k=3)
    assert top.groupby("query_id")["score"].apply(lambda s: s.is_monotonic_decreasing).all()


def test_cg_solves_its_own_damped_system_by_default():
    """Without CG the default is EK-FAC's damping (1 × each module's mean eigenvalue) and the true
    Fisher by sampled labels; with CG on a classifier, the Fisher's exact expectation over the
    classes and 10 × the whole model's mean eigenvalue; other tasks (here a regression) keep
    sampling, with 30 ×, against the sample's noise (benchmarks/cg.py, cg_check.py); what the user
    gives is kept either way."""
    regression = ModuleTask(loss_fn="mse")
    assert InfluenceConfig().solve_damping() == (1.0, "relative")
    assert InfluenceConfig(cg_steps=5).solve_damping("exact") == (10.0, "model")
    assert InfluenceConfig(cg_steps=5).solve_damping("true") == (30.0, "model")
    assert InfluenceConfig(damping=2.0, cg_steps=5).solve_damping() == (2.0, "model")
    with pytest.raises(hw.UserError, match="absolute needs a --damping"):
        InfluenceConfig(damping_mode="absolute", cg_steps=5).solve_damping()
    assert InfluenceConfig().solve_curvature(ModuleTask()).fisher == "true"
    assert InfluenceConfig(cg_steps=5).solve_curvature(ModuleTask()).fisher == "exact"
    assert InfluenceConfig(cg_steps=5).solve_curvature(regression).fisher == "true"
    assert InfluenceConfig(curvature=CurvatureConfig(fisher="true"), cg_steps=5).solve_curvature(ModuleTask()).fisher == "true"


def test_cg_on_the_exact_fisher_converges_to_the_dense_gauss_newton_solve():
    """fisher="exact" (every class weighted by its probability, in the factors and in CG's
    products) is the Gauss–Newton matrix: converged CG equals the dense GN solve, built
    independently from the softmax's Jacobian, with one λ = damping × its mean diagonal."""
    records = logistic_data(n=30)
    model, task = classifier().double(), ModuleTask()
    queries = logistic_data(n=3, seed=2)
    config = InfluenceConfig(curvature=CurvatureConfig(batch_size=8), cg_steps=80)
    inf = EKFAC(model, task, config).fit(records)
    assert inf.curvature.config.fisher == "exact"
    dense = dense_gauss_newton(model, task, records)
    lam = 10.0 * float(dense.matrix.diagonal().mean())  # CG's default on the exact Fisher
    assert inf._damping(next(iter(inf.curvature.modules))) == pytest.approx(lam, rel=1e-8)
    g = record_gradients(inf.collector, queries, hw.Loss())
    flat = lambda d: torch.cat([t.reshape(t.shape[0], -1) for t in d.values()], 1).double()  # noqa: E731
    want = torch.linalg.solve(dense.matrix + lam * torch.eye(len(dense.matrix), dtype=torch.float64), flat(g).T).T
    got = flat(inf.preconditioned_queries(queries, hw.Loss()))
    assert ((got - want).norm() / want.norm()).item() < 1e-6
    used = inf.score(queries).config  # what was filled in is saved with the scores
    assert (used["damping"], used["damping_mode"], used["curvature"]["fisher"]) == (10.0, "model", "exact")


def test_exact_fisher_factors_of_a_linear_classifier_match_the_closed_form():
    """For a linear softmax classifier the exact Fisher is known: S = mean over examples of
    diag(p) − ppᵀ (the softmax's Hessian), A = mean of [x, 1][x, 1]ᵀ, and EK-FAC's eigenvalues
    are the diagonal of the Gauss–Newton matrix in the Kronecker eigenbasis."""
    records = logistic_data(n=24)
    torch.manual_seed(1)
    model, task = torch.nn.Linear(4, 3).double(), ModuleTask()
    curv = fit_curvature(model, task, records, config=CurvatureConfig(fisher="exact", batch_size=5), progress=False)
    m = next(iter(curv.modules.values()))
    x = torch.stack([r["x"] for r in records])
    p = model(x).softmax(1).detach()
    S = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    torch.testing.assert_close(m.q_s @ torch.diag(m.lam_s) @ m.q_s.T, S, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m.q_a @ torch.diag(m.lam_a) @ m.q_a.T, xa.T @ xa / len(x), rtol=1e-10, atol=1e-12)
    K = torch.kron(m.q_s, m.q_a)  # the eigenbasis, for gradients flattened [d_out, d_in_aug] row-major
    G = dense_gauss_newton(model, task, records).matrix
    torch.testing.assert_close(m.corrected.flatten(), torch.diagonal(K.T @ G @ K), rtol=1e-8, atol=1e-12)


def test_the_exact_fisher_of_a_task_without_classes_is_refused_in_one_line():
    model, task = classifier().double(), ModuleTask(loss_fn="mse", target_key="t")
    records = [{"x": r["x"], "t": torch.zeros(3, dtype=torch.float64)} for r in logistic_data(n=8)]
    with pytest.raises(hw.UserError, match="fisher='exact'.*classifier") as err:
        fit_curvature(model, task, records, config=CurvatureConfig(fisher="exact"), progress=False)
    assert "\n" not in str(err.value)
