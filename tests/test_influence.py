"""Influence functions against leave-one-out retraining and dense linear algebra."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from headwater.collect import GradientCollector
from headwater.curvature import CurvatureConfig, _batches, _loss_fn, fit_curvature
from headwater.methods.influence import InfluenceFunction, dense_gauss_newton, full_gradients
from headwater.projection import ProjectionConfig
from headwater.task import ClassificationTask


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
    task = ClassificationTask(dtype=torch.float64)
    G = dense_gauss_newton(model, task, records, damping=reg)
    scores = InfluenceFunction(model, task, G).scores(records, queries)  # [n, q]

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


def test_cg_refinement_converges_to_the_full_damped_solve():
    records = logistic_data(n=40)
    model, task = classifier(), ClassificationTask(dtype=torch.float64)
    model = model.double()
    config = CurvatureConfig(fisher="true", batch_size=8, seed=4, damping=0.1)
    curv = fit_curvature(model, task, records, config=config, progress=False)
    queries = logistic_data(n=3, seed=2)
    # Dense full Fisher of the same sample (same sampled labels), with each module's damping.
    col = GradientCollector(model, task, ProjectionConfig("none"))
    batches = _batches(task, records, config)
    rows = torch.cat([col(b, _loss_fn(task, config, i)) for i, b in enumerate(batches)]).double()
    Fd = rows.T @ rows / rows.shape[0]
    damp = torch.cat([torch.full((b - a,), curv.damping_for(n)) for n, (a, b) in col.segments.items()]).double()
    errors = []
    for steps in (0, 3, 80):  # condition number ~400: PCG needs ~80 steps to reach the float floor
        inf = InfluenceFunction(model, task, curv, cg_steps=steps, cg_records=records)
        g = inf.query_gradients(queries)
        flat = lambda d: torch.cat([t.reshape(t.shape[0], -1) for t in d.values()], 1).double()
        want = torch.linalg.solve(Fd + torch.diag(damp), flat(g).T).T
        got = flat(inf.precondition(g))
        errors.append(((got - want).norm() / want.norm()).item())
    assert errors[1] < errors[0]
    assert errors[2] < 1e-4, errors


@pytest.mark.parametrize("rank", [None, 9, 1])
def test_streaming_scores_equal_dense_dot_products(rank):
    records = logistic_data(n=20)
    model, task = classifier(), ClassificationTask()
    curv = fit_curvature(model, task, records, config=CurvatureConfig(batch_size=8), progress=False)
    queries = logistic_data(n=3, seed=3)
    inf = InfluenceFunction(model, task, curv, rank=rank, batch_size=7)
    h = inf.precondition(inf.query_gradients(queries))
    train = full_gradients(inf.collector, [task.collate([task.encode(r)[0] for r in records])])
    want = sum(torch.einsum("noi,qoi->nq", train[n], h[n]) for n in h).numpy()
    got = inf.scores(records, queries)
    if rank in (None, 9):  # rank 9 >= every module's smaller side: the factorisation is exact
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    else:
        assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.5
        assert not np.allclose(got, want, rtol=1e-3)


@pytest.mark.parametrize("method", ["ekfac", "kfac"])
def test_index_influence_equals_streaming_scores(tmp_path, method):
    """Through an index (projection none) the scores are exactly the streamed influence scores."""
    import headwater as hw
    from headwater.curvature import Curvature

    records = [{"x": r["x"].tolist(), "y": r["y"]} for r in logistic_data(n=24)]
    queries = [{"x": r["x"].tolist(), "y": r["y"]} for r in logistic_data(n=3, seed=9)]
    model, task = classifier().float(), ClassificationTask()
    index = hw.build_index(tmp_path / "idx", model, records, task=task, config=hw.BuildConfig(projection="none", dtype="float32"), progress=False)
    with pytest.raises(hw.UserError, match="no curvature"):
        index.scores(queries, method=method, model=model, task=task)
    index.fit_curvature(CurvatureConfig(seed=1, batch_size=8), model=model, task=task, progress=False)
    got = index.scores(queries, method=method, model=model, task=task)
    want = InfluenceFunction(model, task, Curvature.load(index.curvature_path), ekfac=method == "ekfac").scores(records, queries)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    top = index.query(queries, method=method, model=model, task=task, top_k=3)
    assert top.groupby("query_id")["score"].apply(lambda s: s.is_monotonic_decreasing).all()
