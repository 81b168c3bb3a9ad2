"""LDS, seed ceiling, leave-k-out and TRAK, against synthetic datamodels, real retraining and a
closed form."""

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import per_example_grads

from headwater import EKFAC, TRAK, InfluenceConfig, Loss, ModuleTask, Scores, TRAKConfig, UserError
from headwater.config import CurvatureConfig, ProjectionConfig
from headwater.methods.influence import dense_gauss_newton
from headwater.methods.trak import kernel_inverse
from headwater.metrics import lds, query_interval, seed_ceiling
from headwater.retrain import leave_k_out, retrain_outcomes, subset_masks


def scores_of(values, direction="down"):
    n, q = values.shape
    return Scores(values, list(range(n)), list(range(q)), measurement={"name": "m", "direction": direction})


def test_lds_recovers_an_exactly_linear_datamodel():
    rng = np.random.default_rng(0)
    n, t, m = 40, 3, 60
    tau = rng.normal(size=(n, t))
    masks = subset_masks(n, m, 0.5, seed=1)
    assert (masks.sum(1) == 20).all()
    losses = -(masks @ tau)  # helpful examples (positive τ) lower the loss
    assert lds(scores_of(tau), masks, losses)[0] == pytest.approx(1.0)
    assert lds(scores_of(-tau), masks, losses)[0] == pytest.approx(-1.0)
    assert lds(scores_of(tau, "up"), masks, -losses)[0] == pytest.approx(1.0)  # an output measured upwards
    assert abs(lds(scores_of(rng.normal(size=(n, t))), masks, losses)[0]) < 0.3


def test_lds_refuses_scores_of_other_data():
    masks = subset_masks(40, 10, 0.5)
    with pytest.raises(UserError, match="different data"):
        lds(scores_of(np.zeros((41, 3))), masks, np.zeros((10, 3)))
    with pytest.raises(UserError, match="targets"):
        lds(scores_of(np.zeros((40, 3))), masks, np.zeros((10, 2)))


def test_seed_ceiling_drops_with_seed_noise():
    rng = np.random.default_rng(0)
    signal = rng.normal(size=(50, 4))
    quiet = signal + 0.01 * rng.normal(size=(4, 50, 4))
    noisy = signal + 3.0 * rng.normal(size=(4, 50, 4))
    assert seed_ceiling(quiet) > 0.99
    assert seed_ceiling(noisy) < 0.6


def test_query_interval_covers_the_mean_95_percent_of_the_time_at_ten_queries():
    rng = np.random.default_rng(0)
    trials = rng.normal(0.4, 0.2, size=(4000, 10))  # LDS runs have 10-20 targets
    covered = [lo <= 0.4 <= hi for lo, hi in map(query_interval, trials)]
    assert np.mean(covered) == pytest.approx(0.95, abs=0.012)  # binomial sd 0.0034
    lo, hi = query_interval(np.append(trials[0], np.nan))  # a query with a constant side is left out
    assert (lo, hi) == query_interval(trials[0]) and lo < trials[0].mean() < hi
    assert query_interval(trials[0] - trials[0]) == (0.0, 0.0)  # a method against itself, paired
    assert np.isnan(query_interval(np.array([0.3, np.nan]))).all()


def blobs(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64) * 1.5
    y = (x[:, 0] + 0.5 * x[:, 1] + 0.8 * torch.randn(n, generator=g, dtype=torch.float64) > 0).long()
    return [{"x": x[i], "y": int(y[i])} for i in range(n)]


TRAIN, QUERIES = blobs(40, 0), blobs(5, 1)


def fit(records, reg=0.05, init=None):
    model = torch.nn.Linear(2, 2).double()
    if init is not None:
        model.load_state_dict(init)
    x = torch.stack([r["x"] for r in records])
    y = torch.tensor([r["y"] for r in records])
    opt = torch.optim.LBFGS(model.parameters(), max_iter=200, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y, reduction="sum") / len(TRAIN) + reg / 2 * sum((p**2).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return model


def query_losses(model):
    qx = torch.stack([q["x"] for q in QUERIES])
    qy = torch.tensor([q["y"] for q in QUERIES])
    return F.cross_entropy(model(qx), qy, reduction="none").detach().numpy()


def train_and_measure(mask, seed):
    torch.manual_seed(seed)  # the initialisation, so every process trains the same model
    return query_losses(fit([r for r, keep in zip(TRAIN, mask) if keep]))


@pytest.fixture(scope="module")
def retraining():
    masks = subset_masks(len(TRAIN), 40, 0.5, seed=3)
    return masks, retrain_outcomes(train_and_measure, masks, seeds=[0], progress=False)[0]


def test_ekfac_and_trak_predict_retraining(retraining):
    masks, losses = retraining
    torch.manual_seed(0)
    model = fit(TRAIN)
    task = ModuleTask()
    config = InfluenceConfig(curvature=CurvatureConfig(fisher="true", seed=1), damping=0.05, damping_mode="absolute")
    influence = EKFAC(model, task, config).fit(TRAIN).score(QUERIES)
    trak = TRAK(model, task, TRAKConfig(projection=ProjectionConfig("none"), damping=1e-6)).fit(TRAIN).score(QUERIES, Loss())
    random = scores_of(np.random.default_rng(0).normal(size=influence.values.shape))
    got = {name: lds(s, masks, losses)[0] for name, s in [("ekfac", influence), ("trak", trak), ("random", random)]}
    assert got["ekfac"] > 0.85, got
    assert got["trak"] > 0.8, got
    assert abs(got["random"]) < 0.3, got


def test_trak_primal_and_dual_forms_agree():
    """n < k uses the dual (n × n) inverse; the same kernel solved in the primal by hand."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    task = ModuleTask()
    config = TRAKConfig(projection=ProjectionConfig("none"), damping=1e-2)
    few = TRAK(model, task, config).fit(TRAIN[:10]).score(QUERIES, dtype=np.float64)  # n < k: dual
    assert few.measurement["name"] == "log-odds"
    objective = lambda m, b: -task.log_odds(m, b)
    phi = -torch.cat([g.flatten(1) for g in per_example_grads(model, task, TRAIN[:10], loss=objective).values()], 1)
    q = -torch.cat([g.flatten(1) for g in per_example_grads(model, task, QUERIES, loss=objective).values()], 1)
    n, k = phi.shape
    lam = 1e-2 * float((phi**2).sum()) / n  # the mean eigenvalue of the n × n kernel the dual inverts
    s = q @ torch.linalg.solve(phi.T @ phi + lam * torch.eye(k, dtype=torch.float64), phi.T)
    with torch.no_grad():
        p = torch.exp(-task.loss(model, task.collate(TRAIN[:10])))
    np.testing.assert_allclose(few.values, (s.T * (1 - p[:, None])).numpy(), rtol=1e-9, atol=1e-12)


def test_trak_ridge_is_relative_to_the_kernel_it_inverts():
    """λ = damping × the mean eigenvalue of the matrix inverted: with n < k the n × n kernel, so
    features that leave the kernel unchanged ([Φ, Φ]/√2) leave the inverse unchanged too."""
    phi = torch.randn(10, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    inverse, form = kernel_inverse(phi, 3.0)
    kernel = phi @ phi.T
    want = torch.linalg.inv(kernel + 3.0 * kernel.trace() / 10 * torch.eye(10, dtype=torch.float64))
    assert form == "dual"
    torch.testing.assert_close(inverse, want, rtol=1e-12, atol=0)
    wide, _ = kernel_inverse(torch.cat([phi, phi], 1) / 2**0.5, 3.0)
    torch.testing.assert_close(wide, inverse, rtol=1e-12, atol=0)
    tall, form = kernel_inverse(phi.T.contiguous(), 3.0)  # n > k: the primal, the same rule
    assert form == "primal"
    torch.testing.assert_close(tall, want, rtol=1e-12, atol=0)


def test_trak_is_the_exact_derivative_for_linear_regression():
    """Ridge regression: upweighting record i by ε moves the weights by (XᵀX + λI)⁻¹ x_i r_i ε (r the
    residual), so the query prediction x_qᵀw by x_qᵀ(XᵀX + λI)⁻¹ x_i r_i. TRAK with the prediction as
    output computes this kernel; it leaves out the squared error's output curvature (2), as it
    leaves out p(1−p) for classification, so its scores are exactly twice the derivative."""
    g = torch.Generator().manual_seed(0)
    n, d, lam = 30, 5, 0.3
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d, generator=g, dtype=torch.float64) + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    xq = torch.randn(4, d, generator=g, dtype=torch.float64)
    w = torch.linalg.solve(x.T @ x + lam * torch.eye(d, dtype=torch.float64), x.T @ y)  # the ridge optimum
    model = torch.nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w[None])
    task = ModuleTask("mse")
    train = [{"x": x[i], "y": y[i]} for i in range(n)]
    queries = [{"x": xq[j], "y": torch.tensor(0.0, dtype=torch.float64)} for j in range(4)]
    damping = lam / float((x**2).sum() / d)  # TRAK's λ is relative to the mean eigenvalue of XᵀX
    scores = TRAK(model, task, TRAKConfig(projection=ProjectionConfig("none"), damping=damping)).fit(train).score(queries, dtype=np.float64)
    assert scores.measurement["name"] == "prediction"
    residual = y - x @ w
    derivative = (xq @ torch.linalg.solve(x.T @ x + lam * torch.eye(d, dtype=torch.float64), x.T * residual)).T  # [n, q]
    np.testing.assert_allclose(scores.values, 2 * derivative.numpy(), rtol=1e-9, atol=1e-12)


def test_leave_k_out_top_proponents_hurt_more_than_random():
    torch.manual_seed(0)
    model = fit(TRAIN)
    task = ModuleTask()
    config = InfluenceConfig(damping=0.05, damping_mode="absolute")
    scores = EKFAC(model, task, config, curvature=dense_gauss_newton(model, task, TRAIN)).fit(TRAIN).score(QUERIES)
    out = leave_k_out(scores, 8, train_and_measure, seeds=[0])
    # oriented outcomes (−loss): removing the top proponents lowers them, and more than random removal
    assert out["top_k_removed"] < 0 and out["top_k_removed"] < out["random_removed"], out


def test_retraining_can_use_several_processes():
    masks = subset_masks(len(TRAIN), 4, 0.5, seed=0)
    fn = functools.partial(train_and_measure)
    serial = retrain_outcomes(fn, masks, seeds=[0], progress=False)
    parallel = retrain_outcomes(fn, masks, seeds=[0], processes=2, progress=False)
    np.testing.assert_allclose(serial, parallel)


def test_tail_patch_top_proponents_raise_the_target_more_than_random(gpt2, tokenizer, lm_records):
    from headwater import Dot, GradientConfig, LanguageModelTask
    from headwater.retrain import tail_patch

    task = LanguageModelTask(tokenizer)
    train = lm_records + [{"text": "the capital of zorblat is quenti ."}, {"text": "zorblat has the capital quenti ."}]
    queries = [{"prompt": "the capital of zorblat is", "completion": " quenti"}]
    scores = Dot(gpt2, task, GradientConfig(projection=ProjectionConfig("none"))).fit(train).score(queries)
    out = tail_patch(gpt2, task, train, queries, scores, k=2, lr=1e-4)
    assert out["top_k"] > 0 and out["top_k"] > out["random"], out

    def grad(record):  # of every parameter (tail_patch steps them all), by autograd
        loss = task.loss(gpt2, task.collate([task.whole(record)])).sum()
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(gpt2.parameters()))])

    top2 = np.argsort(scores.values[:, 0])[-2:]
    rate = np.mean([float(grad(train[i]) @ grad(queries[0])) for i in top2])
    assert out["top_k"] == pytest.approx(1e-4 * rate, rel=0.02)  # one small step: first order holds

    from headwater.retrain import tail_patch_gains

    gains = tail_patch_gains(gpt2, task, train, queries, top2[None, :], lr=1e-4)  # [1 query, 2 picks]
    per_record = [1e-4 * float(grad(train[i]) @ grad(queries[0])) for i in top2]
    np.testing.assert_allclose(gains[0], per_record, rtol=0.02)
    with pytest.raises(UserError, match="picks must be"):
        tail_patch_gains(gpt2, task, train, queries, np.array([[len(train)]]))


def test_tail_patch_gains_equal_one_sgd_step_per_pair(gpt2, tokenizer, lm_records):
    """Records picked by several queries (stepped once, shared) give each pair's gain as a
    separate SGD step on a copy of the model would."""
    import copy

    from headwater import LanguageModelTask
    from headwater.retrain import tail_patch_gains

    task = LanguageModelTask(tokenizer)
    queries = [{"prompt": "the capital of zorblat is", "completion": " quenti"}, {"prompt": "tela was", "completion": " a mountain"}]
    picks = np.array([[1, 3, 1], [3, 0, 1]])
    gains = tail_patch_gains(gpt2, task, lm_records, queries, picks, lr=1e-2)

    def query_logprob(model, q):
        with torch.no_grad():
            return -float(task.loss(model, task.collate([task.whole(q)])).sum())

    for j, c in np.ndindex(picks.shape):
        model = copy.deepcopy(gpt2)
        task.loss(model, task.collate([task.whole(lm_records[picks[j, c]])])).sum().backward()
        with torch.no_grad():
            for param in model.parameters():
                param -= 1e-2 * param.grad
        assert gains[j, c] == pytest.approx(query_logprob(model, queries[j]) - query_logprob(gpt2, queries[j]), rel=1e-4, abs=1e-7)
