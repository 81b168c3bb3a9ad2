"""SOURCE at its two limits (TracIn and influence functions), momentum, and trainer_state parsing."""

import json

import numpy as np
import pytest
import torch
from reference import per_example_grads

from headwater import EKFAC, SOURCE, InfluenceConfig, ModuleTask, Segment, SourceConfig, segments_from_trainer_state
from headwater.config import CurvatureConfig
from headwater.errors import UserError
from headwater.methods.source import adam_scale_of


def setup():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 3, generator=g, dtype=torch.float64)
    y = (x[:, 0] - x[:, 2] > 0).long()
    records = [{"x": x[i], "y": int(y[i])} for i in range(24)]
    queries = [{"x": x[i], "y": int(y[i])} for i in range(24, 30)]
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    return model, ModuleTask(), records, queries


CONFIG = CurvatureConfig(fisher="true", seed=2)


def source_scores(model, task, records, queries, segments, curvature=CONFIG, momentum=0.0):
    config = SourceConfig(curvature=curvature, momentum=momentum)
    return SOURCE(segments, task, config, final_model=model).fit(records).score(queries, dtype=np.float64).values


def test_small_step_limit_is_tracin():
    model, task, records, queries = setup()
    eta_k = 1e-7
    got = source_scores(model, task, records, queries, [Segment([model], lr=eta_k, steps=1)])
    tr, q = per_example_grads(model, task, records), per_example_grads(model, task, queries)
    want = eta_k * sum(torch.einsum("noi,qoi->nq", tr[n], q[n]) for n in tr).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12 * np.abs(want).max())


def test_long_training_limit_is_the_influence_function():
    model, task, records, queries = setup()
    got = source_scores(model, task, records, queries, [Segment([model], lr=1.0, steps=10**9)])
    config = InfluenceConfig(curvature=CONFIG, damping=1e-12, damping_mode="absolute")
    want = EKFAC(model, task, config).fit(records).score(queries, dtype=np.float64).values
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6 * np.abs(want).max())


def test_momentum_lengthens_the_effective_step():
    model, task, records, queries = setup()
    a = source_scores(model, task, records, queries, [Segment([model], lr=0.05, steps=40)], momentum=0.75)
    b = source_scores(model, task, records, queries, [Segment([model], lr=0.2, steps=40)])
    np.testing.assert_allclose(a, b, rtol=1e-10)


def test_two_segments_differ_from_one_and_sum_their_parts():
    """With a second, later segment the first segment's contribution is propagated through
    exp(−ηK H̄) of the later one: the total is not the sum of the segments scored alone."""
    model, task, records, queries = setup()
    early, late = Segment([model], lr=0.1, steps=20), Segment([model], lr=0.1, steps=30)
    both = source_scores(model, task, records, queries, [early, late])
    one = source_scores(model, task, records, queries, [Segment([model], lr=0.1, steps=50)])
    # same checkpoint in both segments: H̄ is shared, so the two-segment walk equals one long segment
    np.testing.assert_allclose(both, one, rtol=1e-9, atol=1e-12)
    alone = sum(source_scores(model, task, records, queries, [s]) for s in (early, late))
    assert not np.allclose(both, alone, rtol=1e-3)


def test_segments_from_trainer_state(tmp_path):
    state = {"log_history": [{"step": s, "learning_rate": lr} for s, lr in [(10, 1e-3), (20, 1e-3), (30, 5e-4), (40, 5e-4), (50, 1e-4)]]}
    path = tmp_path / "trainer_state.json"
    path.write_text(json.dumps(state))
    a, b = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    segs = segments_from_trainer_state(path, {20: a, 50: b})
    assert [(s.steps, s.checkpoints[0]) for s in segs] == [(20, a), (30, b)]
    assert segs[0].lr == pytest.approx(1e-3) and segs[1].lr == pytest.approx((5e-4 + 5e-4 + 1e-4) / 3)


def test_adam_with_a_constant_step_scale_is_sgd_with_that_much_larger_rate():
    model, task, records, queries = setup()
    scale = {n: torch.full_like(p, 7.0) for n, p in model.named_parameters()}
    a = source_scores(model, task, records, queries, [Segment([model], lr=0.01, steps=40, adam_scale=scale)])
    b = source_scores(model, task, records, queries, [Segment([model], lr=0.07, steps=40)])
    np.testing.assert_allclose(a, b, rtol=1e-10)


def test_adam_segments_equal_the_dense_linearised_adam_map():
    """One-hot inputs make the curvature diagonal in parameter space, where Adam's diagonal P
    commutes with it: SOURCE's per-eigendirection steps must then equal the dense map
    Σ_ℓ qᵀ E_later C_ℓ g with C = (PH̄)⁻¹(I − e^{−ηK P H̄})P, E = e^{−ηK P H̄} (matrix exponentials)."""
    x = torch.eye(4, dtype=torch.float64)
    counts = [2, 3, 5, 8]  # distinct eigenvalues
    g = torch.Generator().manual_seed(0)
    records = [{"x": x[j], "y": float(torch.randn(1, generator=g))} for j, c in enumerate(counts) for _ in range(c)]
    queries = [{"x": torch.tensor([0.3, -1.0, 0.5, 2.0], dtype=torch.float64), "y": 0.5}]
    task = ModuleTask("mse")
    models, scales = [], []
    for seed in (1, 2):
        torch.manual_seed(seed)
        models.append(torch.nn.Linear(4, 1, bias=False).double())
        scales.append({"weight": torch.rand(1, 4, generator=g, dtype=torch.float64) * 5 + 0.5})
    segments = [Segment([m], lr=0.02 * (k + 1), steps=30, adam_scale=s) for k, (m, s) in enumerate(zip(models, scales))]
    method = SOURCE(segments, task, SourceConfig(curvature=CONFIG), final_model=models[-1]).fit(records)
    got = method.score(queries, dtype=np.float64).values[:, 0]

    def dense(k):
        curv = method.curvatures[k].modules[""]
        q_full = torch.kron(curv.q_s, curv.q_a)
        h = q_full @ torch.diag(curv.eigenvalues().reshape(-1)) @ q_full.T
        p = torch.diag(scales[k]["weight"].reshape(-1))
        m = segments[k].lr * segments[k].steps * p @ h
        e = torch.linalg.matrix_exp(-m)
        return torch.linalg.solve(p @ h, (torch.eye(4, dtype=torch.float64) - e) @ p), e

    def grad(model, record):
        model.zero_grad()
        task.loss(model, task.collate([task.whole(record)])).sum().backward()
        return model.weight.grad.reshape(-1).clone()

    q = grad(models[-1], queries[0])
    (c0, _), (c1, e1) = dense(0), dense(1)
    want = [q @ c1 @ grad(models[1], r) + q @ e1 @ c0 @ grad(models[0], r) for r in records]
    np.testing.assert_allclose(got, torch.stack(want).numpy(), rtol=1e-9)


def test_adam_scale_floors_second_moments_that_stayed_at_zero():
    """A key bias's gradient is zero (softmax ignores a shift), so its v̂ stays near 0 and P near
    1/ε; each tensor's v̂ is floored at 1e-3 of its mean, the rest untouched."""
    v = {"w": torch.tensor([[4e-4, 1e-4, 1e-21, 9e-4]]), "b": torch.tensor([2e-6, 3e-6])}
    step, beta2, eps = 5, 0.99, 1e-8
    got = adam_scale_of(v, step, beta2, eps)
    for name, raw in v.items():
        v_hat = raw.double().numpy() / (1 - beta2**step)
        want = 1 / (np.sqrt(np.maximum(v_hat, 1e-3 * v_hat.mean())) + eps)
        np.testing.assert_allclose(got[name].numpy(), want, rtol=1e-12)
    assert got["w"][0, 2] < 40 * got["w"][0, 0]  # unfloored it is ≈ 1e8, 10⁶ times its neighbours'
    unfloored = adam_scale_of(v, step, beta2, eps, floor=0.0)["w"][0, 2]
    assert unfloored == pytest.approx(1 / (np.sqrt(1e-21 / (1 - beta2**step)) + eps), rel=1e-6)  # 1e-21 is stored in float32


def test_source_keeps_kronecker_blocks_where_influence_keeps_whole_conv_blocks():
    """SOURCE's unrolled steps predict worse with whole convolution blocks (docs/benchmarks.md),
    and its Adam step sizes are per Kronecker eigendirection, so it keeps the Kronecker blocks
    (and refuses to be given whole ones, in one line); EK-FAC keeps small convolutions whole."""
    from reference import cnn, image_records

    model, task, records = cnn(), ModuleTask("cross_entropy"), image_records(8)
    blocks = lambda curv: [m.block is not None for m in curv.modules.values()]  # noqa: E731
    influence = EKFAC(model, task).fit(records).curvature
    convs = [isinstance(model.get_submodule(n), torch.nn.Conv2d) for n in influence.modules]
    assert blocks(influence) == convs and any(convs)
    source = lambda **kw: SOURCE([Segment([model], lr=0.1, steps=3)], task, SourceConfig(**kw)).fit(records)  # noqa: E731
    assert not any(blocks(source().curvatures[0]))
    with pytest.raises(UserError, match="SOURCE uses the Kronecker-factored blocks only"):
        source(curvature=CurvatureConfig(dense_conv_blocks=4096))
