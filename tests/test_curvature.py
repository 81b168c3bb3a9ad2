"""KFAC / EK-FAC factors against dense per-module Fisher matrices."""

import pytest
import torch
from reference import cnn, image_records

from headwater.collect import GradientCollector
from headwater.config import CurvatureConfig, ProjectionConfig
from headwater.curvature import Curvature, curvature_batches, fisher_loss, fit_curvature
from headwater.methods.influence import dense_gauss_newton
from headwater.task import LanguageModelTask, ModuleTask


def mlp_setup(n=48):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.Tanh(), torch.nn.Linear(12, 4)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 5, generator=g).double()
    records = [{"x": x[i], "y": int((x[i, 0] > 0) + 2 * (x[i, 1] > 0))} for i in range(n)]
    return model, ModuleTask(), records


def dense_fisher(model, task, records, config):
    """Per module: (1/N) Σ_n vec(DW_n) vec(DW_n)ᵀ from per-example gradients under the same labels."""
    col = GradientCollector(model, task, ProjectionConfig("none"))
    rows = torch.cat([col(b, fisher_loss(task, config, i)) for i, b in enumerate(curvature_batches(task, records, config))]).double()
    return {n: rows[:, a:b].T @ rows[:, a:b] / rows.shape[0] for n, (a, b) in col.segments.items()}, col


def kron_basis(m):
    return torch.kron(m.q_s, m.q_a)  # vec row-major: index (o, i) -> o * d_in + i


@pytest.mark.parametrize("setup,fisher", [("mlp", "empirical"), ("mlp", "true"), ("cnn", "true")])
def test_ekfac_eigenvalues_are_the_dense_diagonal_in_the_kfac_basis(setup, fisher):
    model, task, records = mlp_setup() if setup == "mlp" else (cnn(), ModuleTask("cross_entropy"), image_records(12))
    config = CurvatureConfig(fisher=fisher, batch_size=8 if setup == "mlp" else 4, seed=3)
    curv = fit_curvature(model, task, records, config=config, progress=False)
    dense, _ = dense_fisher(model, task, records, config)
    for name, m in curv.modules.items():
        q = kron_basis(m)
        want = torch.diagonal(q.T @ dense[name] @ q).reshape(m.corrected.shape)
        torch.testing.assert_close(m.corrected, want, rtol=1e-10, atol=1e-14)


def test_factors_are_token_and_example_covariances(gpt2, tokenizer, lm_records):
    # float64: the batched (padded) and one-at-a-time passes use different kernels, whose float32
    # round-off (~1e-7, CPU-dependent) would dominate the comparison.
    gpt2 = gpt2.double()
    task = LanguageModelTask(tokenizer)
    config = CurvatureConfig(fisher="empirical", batch_size=2)
    curv = fit_curvature(gpt2, task, lm_records, modules=["transformer.h.0.mlp.c_fc"], config=config, progress=False)
    m = curv.modules["transformer.h.0.mlp.c_fc"]
    # Rebuild A and S by hand, one example at a time (no padding at all).
    acts, deltas = [], []
    layer = gpt2.transformer.h[0].mlp.c_fc
    for rec in lm_records:
        ex = task.encode(rec)[0]
        batch = task.collate([ex])
        store = {}
        h = layer.register_forward_hook(lambda mod, a, o: store.update(a=a[0], o=o))
        loss = task.loss(gpt2, batch).sum()
        h.remove()
        (d,) = torch.autograd.grad(loss, store["o"])
        acts.append(torch.cat([store["a"][0], torch.ones(len(ex.input_ids), 1)], 1).double())
        deltas.append(d[0].double())
    a = torch.cat(acts)
    A = a.T @ a / a.shape[0]
    S = sum(d.T @ d for d in deltas) / len(deltas)
    torch.testing.assert_close(m.q_a @ torch.diag(m.lam_a) @ m.q_a.T, A, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m.q_s @ torch.diag(m.lam_s) @ m.q_s.T, S, rtol=1e-10, atol=1e-14)


def test_ekfac_inverse_hvp_is_close_to_the_dense_damped_solve(capsys):
    model, task, records = mlp_setup(n=96)
    config = CurvatureConfig(fisher="empirical", batch_size=16)
    curv = fit_curvature(model, task, records, config=config, progress=False)
    dense, col = dense_fisher(model, task, records, config)
    g = torch.Generator().manual_seed(7)
    errors = {"ekfac": [], "kfac": []}
    for name, m in curv.modules.items():
        shape = m.corrected.shape
        v = torch.randn(shape, generator=g, dtype=torch.float64)
        for kind, ekfac in (("ekfac", True), ("kfac", False)):
            lam = curv.damping_for(name, 0.1, "relative", ekfac=True)  # same damping for both: compare the curvature only
            got = curv.inverse_hvp({name: v}, lam, "absolute", ekfac=ekfac)[name]
            want = torch.linalg.solve(dense[name] + lam * torch.eye(dense[name].shape[0], dtype=torch.float64), v.reshape(-1)).reshape(shape)
            errors[kind].append(((got - want).norm() / want.norm()).item())
    with capsys.disabled():
        print(f"\n  iHVP relative error vs dense damped solve: EK-FAC {errors['ekfac']}, KFAC {errors['kfac']}")
    # Both are usable approximations here; at equal damping neither is uniformly closer for the
    # inverse. What EK-FAC guarantees is the best diagonal in the KFAC basis for G itself:
    assert max(errors["ekfac"] + errors["kfac"]) < 0.35
    for name, m in curv.modules.items():
        q = kron_basis(m)
        approx = lambda eig: q @ torch.diag(eig.reshape(-1)) @ q.T
        assert (approx(m.eigenvalues(True)) - dense[name]).norm() < (approx(m.eigenvalues(False)) - dense[name]).norm()


@pytest.mark.parametrize("block_fisher", [None, "true"])
def test_small_convolutions_keep_their_whole_fisher_block(block_fisher):
    """Convolutions of at most `dense_conv_blocks` parameters apply functions of their whole
    Fisher block; larger ones, and linear layers of any size, keep EK-FAC's diagonal in the
    Kronecker basis, from per-example gradients under the sampled labels. A classifier's blocks
    are by default the exact Gauss–Newton blocks (the expectation over the classes, built
    independently from the softmax); with dense_fisher="true" they use the sampled labels too."""
    model, task, records = cnn(), ModuleTask("cross_entropy"), image_records(12)
    sizes = {n: sum(p.numel() for p in m.parameters()) for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    convs = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    limit = sorted(sizes[n] for n in convs)[-2]  # every convolution but the largest
    config = CurvatureConfig(fisher="true", batch_size=4, seed=3, dense_conv_blocks=limit, dense_fisher=block_fisher)
    curv = fit_curvature(model, task, records, config=config, progress=False)
    sampled, col = dense_fisher(model, task, records, config)
    gn = dense_gauss_newton(model, task, records).matrix
    exact = {n: gn[a:b, a:b] for n, (a, b) in col.segments.items()}
    g = torch.Generator().manual_seed(0)
    for name, m in curv.modules.items():
        assert (m.block is not None) == (name in convs and sizes[name] <= limit)
        if m.block is not None:
            block = exact[name] if block_fisher is None else sampled[name]
        else:
            block = kron_basis(m) @ torch.diag(m.corrected.flatten()) @ kron_basis(m).T
        lam = 0.1 * float(torch.diagonal(block).mean())
        assert float(m.eigenvalues().mean()) == pytest.approx(float(torch.diagonal(block).mean()), rel=1e-10)
        v = torch.randn(3, *m.corrected.shape, generator=g, dtype=torch.float64)
        want = torch.linalg.solve(block + lam * torch.eye(len(block), dtype=torch.float64), v.reshape(3, -1).T).T.reshape(v.shape)
        torch.testing.assert_close(m.apply(v, lambda e: 1 / (e + lam)), want, rtol=1e-8, atol=1e-12)
        if m.block is None:  # the Kronecker modules' diagonal is the sampled Fisher's either way
            torch.testing.assert_close(m.corrected.flatten(), torch.diagonal(kron_basis(m).T @ sampled[name] @ kron_basis(m)), rtol=1e-8, atol=1e-14)
    assert sum(m.block is not None for m in curv.modules.values()) == len(convs) - 1


@pytest.mark.parametrize("setup", ["mlp", "cnn"])
def test_save_load_roundtrip(tmp_path, setup):
    model, task, records = mlp_setup() if setup == "mlp" else (cnn(), ModuleTask("cross_entropy"), image_records(8))
    curv = fit_curvature(model, task, records, config=CurvatureConfig(seed=2, batch_size=4), progress=False)
    assert any(m.block is not None for m in curv.modules.values()) == (setup == "cnn")  # the default keeps small convolutions whole
    curv.save(tmp_path / "curvature.safetensors")
    back = Curvature.load(tmp_path / "curvature.safetensors")
    assert back.config == curv.config and back.examples == curv.examples == len(records)
    for name, m in curv.modules.items():
        for key in ("q_a", "lam_a", "q_s", "lam_s", "corrected"):
            assert torch.equal(getattr(back.modules[name], key), getattr(m, key))
        assert (back.modules[name].block is None) == (m.block is None)
        if m.block is not None:
            assert all(torch.equal(a, b) for a, b in zip(back.modules[name].block, m.block))


def test_module_called_twice_counts_both_calls():
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(torch.tanh(self.lin(x)))

    torch.manual_seed(0)
    model = Twice().double()
    task = ModuleTask()
    g = torch.Generator().manual_seed(0)
    records = [{"x": torch.randn(3, generator=g, dtype=torch.float64), "y": i % 3} for i in range(20)]
    config = CurvatureConfig(fisher="empirical", batch_size=5)
    curv = fit_curvature(model, task, records, config=config, progress=False)
    dense, _ = dense_fisher(model, task, records, config)
    m = curv.modules["lin"]
    q = kron_basis(m)
    torch.testing.assert_close(m.corrected, torch.diagonal(q.T @ dense["lin"] @ q).reshape(m.corrected.shape), rtol=1e-10, atol=1e-14)
    # A averages over both calls' inputs: 40 "tokens" for 20 examples.
    assert curv.meta["tokens"]["lin"] == 40
