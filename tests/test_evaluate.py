"""LDS, seed ceiling and leave-k-out, against synthetic datamodels and real retraining."""

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from headwater.curvature import CurvatureConfig, fit_curvature
from headwater.evaluate import leave_k_out, lds, retrain_losses, seed_ceiling, subset_masks
from headwater.methods.influence import InfluenceFunction
from headwater.methods.trak import trak_scores
from headwater.projection import ProjectionConfig
from headwater.task import ClassificationTask


def test_lds_recovers_an_exactly_linear_datamodel():
    rng = np.random.default_rng(0)
    n, t, m = 40, 3, 60
    tau = rng.normal(size=(n, t))
    masks = subset_masks(n, m, 0.5, seed=1)
    assert (masks.sum(1) == 20).all()
    losses = -(masks @ tau)  # helpful examples (positive τ) lower the loss
    assert lds(tau, masks, losses)[0] == pytest.approx(1.0)
    assert lds(-tau, masks, losses)[0] == pytest.approx(-1.0)
    assert abs(lds(rng.normal(size=(n, t)), masks, losses)[0]) < 0.3


def test_seed_ceiling_drops_with_seed_noise():
    rng = np.random.default_rng(0)
    signal = rng.normal(size=(50, 4))
    quiet = signal + 0.01 * rng.normal(size=(4, 50, 4))
    noisy = signal + 3.0 * rng.normal(size=(4, 50, 4))
    assert seed_ceiling(quiet) > 0.99
    assert seed_ceiling(noisy) < 0.6


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
    return masks, retrain_losses(train_and_measure, masks, seeds=[0], progress=False)[0]


def test_ekfac_and_trak_predict_retraining(retraining):
    masks, losses = retraining
    torch.manual_seed(0)
    model = fit(TRAIN)
    task = ClassificationTask(dtype=torch.float64)
    curv = fit_curvature(model, task, TRAIN, config=CurvatureConfig(fisher="true", damping=0.05, damping_mode="absolute", seed=1), progress=False)
    influence = InfluenceFunction(model, task, curv).scores(TRAIN, QUERIES)
    trak = trak_scores([model], task, TRAIN, QUERIES, projection=ProjectionConfig("none"), damping=1e-6)
    random = np.random.default_rng(0).normal(size=influence.shape)
    got = {name: lds(s, masks, losses)[0] for name, s in [("ekfac", influence), ("trak", trak), ("random", random)]}
    assert got["ekfac"] > 0.85, got
    assert got["trak"] > 0.8, got
    assert abs(got["random"]) < 0.3, got


def test_trak_primal_and_dual_forms_agree():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    task = ClassificationTask(dtype=torch.float64)
    few = trak_scores([model], task, TRAIN[:10], QUERIES, projection=ProjectionConfig("none"), damping=1e-2)  # n < k: dual
    # the same problem, primal: repeat the kernel solve by hand
    from headwater.collect import GradientCollector

    col = GradientCollector(model, task, ProjectionConfig("none"))
    phi = col(task.collate([task.encode(r)[0] for r in TRAIN[:10]]), task.per_example_output).double()
    q = col(task.collate([task.encode(r)[0] for r in QUERIES]), task.per_example_output).double()
    lam = 1e-2 * float((phi**2).sum() / phi.shape[1] / phi.shape[0]) * phi.shape[0]
    k = phi.shape[1]
    s = q @ torch.linalg.solve(phi.T @ phi + lam * torch.eye(k, dtype=torch.float64), phi.T)
    with torch.no_grad():
        p = torch.exp(-task.per_example_loss(model, task.collate([task.encode(r)[0] for r in TRAIN[:10]])))
    np.testing.assert_allclose(few, (s.T * (1 - p[:, None])).numpy(), rtol=1e-6, atol=1e-10)


def test_leave_k_out_top_proponents_hurt_more_than_random():
    torch.manual_seed(0)
    model = fit(TRAIN)
    task = ClassificationTask(dtype=torch.float64)
    from headwater.methods.influence import dense_gauss_newton

    scores = InfluenceFunction(model, task, dense_gauss_newton(model, task, TRAIN, damping=0.05)).scores(TRAIN, QUERIES).mean(1)
    out = leave_k_out(scores, 8, train_and_measure, seeds=[0])
    assert out["top_k_removed"] > 0 and out["top_k_removed"] > out["random_removed"], out


def test_retraining_can_use_several_processes():
    masks = subset_masks(len(TRAIN), 4, 0.5, seed=0)
    fn = functools.partial(train_and_measure)
    serial = retrain_losses(fn, masks, seeds=[0], progress=False)
    parallel = retrain_losses(fn, masks, seeds=[0], processes=2, progress=False)
    np.testing.assert_allclose(serial, parallel)


def test_tail_patch_top_proponents_raise_the_target_more_than_random(gpt2, tokenizer, lm_records):
    from headwater.collect import GradientCollector
    from headwater.evaluate import tail_patch
    from headwater.task import LanguageModelTask

    task = LanguageModelTask(tokenizer)
    train = lm_records + [{"text": "the capital of zorblat is quenti ."}, {"text": "zorblat has the capital quenti ."}]
    queries = [{"prompt": "the capital of zorblat is", "completion": " quenti"}]
    col = GradientCollector(gpt2, task, ProjectionConfig("none"))
    g_train = col(task.collate([task.encode(r)[0] for r in train]))
    g_query = col(task.collate([task.encode(q)[0] for q in queries]))
    scores = (g_train @ g_query.T).numpy()  # dot product: first-order change of −loss per unit step
    out = tail_patch(gpt2, task, train, queries, scores, k=2, lr=1e-2)
    assert out["top_k"] > 0 and out["top_k"] > out["random"], out
    top2 = np.sort(scores[:, 0])[-2:]
    assert out["top_k"] == pytest.approx(1e-2 * top2.mean(), rel=0.1)  # one small step: first order holds
