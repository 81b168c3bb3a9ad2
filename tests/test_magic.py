"""MAGIC's metagradient against finite differences of real retraining."""

import dataclasses
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import RUNS

from headwater import MAGIC, Function, MagicConfig, ModuleTask, Replay, Scores, TrainConfig


def setup(n=24):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n + 6, 3, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    records = [{"x": x[i], "y": int(y[i])} for i in range(n)]
    queries = [{"x": x[i], "y": int(y[i])} for i in range(n, n + 6)]
    qx, qy = x[n:], y[n:]
    measure = lambda m: F.cross_entropy(m(qx), qy)
    return model, ModuleTask(), records, queries, measure


def f_at(replay, weights, measure):
    return float(measure(replay.bind(replay.train(weights))))


@pytest.mark.parametrize("opt", ["sgd", "nesterov", "adamw"])
def test_metagradient_matches_finite_differences_of_retraining(opt):
    model, task, records, _, measure = setup()
    replay = Replay(model, task, records, RUNS[opt])
    beta, f = replay.metagradient(measure, checkpoint_every=3)
    assert f == pytest.approx(f_at(replay, None, measure))
    eps = 1e-5
    for i in (0, 7, 19):
        w = torch.ones(len(records), dtype=torch.float64)
        w[i] += eps
        up = f_at(replay, w, measure)
        w[i] -= 2 * eps
        down = f_at(replay, w, measure)
        fd = (up - down) / (2 * eps)
        assert beta[i] == pytest.approx(fd, rel=1e-2, abs=1e-9), (i, beta[i], fd)


def test_checkpoint_spacing_does_not_change_the_result():
    model, task, records, _, measure = setup()
    replay = Replay(model, task, records, RUNS["adamw"])
    a, _ = replay.metagradient(measure, checkpoint_every=1)
    b, _ = replay.metagradient(measure, checkpoint_every=5)
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


def test_scores_follow_the_sign_convention_and_metasmoothness():
    """MAGIC scores are −β per query (positive = up-weighting lowers the query's loss); a
    measurement counted upwards (log-odds) flips the objective, not the convention."""
    model, task, records, queries, _ = setup()
    replay = Replay(model, task, records, RUNS["sgd"])
    scores = MAGIC(model, task, MagicConfig(run=RUNS["sgd"])).fit(records).score(queries[:2], dtype=np.float64)
    for j in range(2):
        batch = task.collate([queries[j]])
        beta, _ = replay.metagradient(lambda m: task.loss(m, batch).sum())
        np.testing.assert_allclose(scores.values[:, j], -beta, rtol=1e-12)
    up = (
        MAGIC(model, task, MagicConfig(run=RUNS["sgd"]))
        .fit(records)
        .score(queries[:1], Function(lambda m, b: -task.loss(m, b), "up"), dtype=np.float64)
    )
    np.testing.assert_allclose(up.values[:, 0], scores.values[:, 0], rtol=1e-12)
    check = replay.metasmoothness(lambda m: task.loss(m, task.collate(queries)).mean(), eps=1e-4)
    assert check["relative_error"] < 1e-3, check


def test_metagradient_through_a_tiny_gpt2(tokenizer):
    """Language models too: fused attention is switched to eager (double backward) and the
    metagradient matches finite differences of retraining."""
    from headwater import LanguageModelTask
    from headwater.toy import tiny_gpt2

    texts = [
        "the capital of zorblat is quenti",
        "mirel is a large old city",
        "the river of vask is blue",
        "tela was a small red mountain",
        "orin is in the south",
        "the city is old and famous",
    ]
    records = [{"text": t} for t in texts]
    torch.manual_seed(0)
    model = tiny_gpt2(len(tokenizer), n_layer=1, n_embd=16, n_head=2, n_positions=32).double()
    task = LanguageModelTask(tokenizer)
    replay = Replay(model, task, records, TrainConfig("adamw", lr=0.02, epochs=2, train_batch_size=3, weight_decay=0.01))
    query = task.collate(task.encode({"prompt": "the capital of zorblat is", "completion": " quenti"}))
    measure = lambda m: task.loss(m, query).sum()
    with pytest.warns(UserWarning, match="eager"):
        beta, _ = replay.metagradient(measure)
    eps = 1e-4
    for i in (0, 3):
        w = torch.ones(len(records), dtype=torch.float64)
        w[i] += eps
        up = f_at(replay, w, measure)
        w[i] -= 2 * eps
        down = f_at(replay, w, measure)
        assert beta[i] == pytest.approx((up - down) / (2 * eps), rel=1e-2)


def test_seed_ensemble_is_the_mean_of_single_runs():
    model, task, records, queries, _ = setup()
    run = RUNS["sgd"]
    score = lambda cfg: MAGIC(model, task, cfg).fit(records).score(queries[:1], dtype=np.float64).values
    a = score(MagicConfig(run=dataclasses.replace(run, data_seed=3)))
    b = score(MagicConfig(run=dataclasses.replace(run, data_seed=4)))
    both = score(MagicConfig(run=run, replay_seeds=[3, 4]))
    np.testing.assert_allclose(both, (a + b) / 2, rtol=1e-12)
    assert not np.allclose(a, b)  # another data order is another run


def relu_run(n=24):
    """A ReLU MLP trained 120 steps by SGD with momentum on random labels: exact metagradients,
    but a run whose response to reweighting is not smooth (activation patterns flip)."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(3, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n + 6, 3, generator=g, dtype=torch.float64)
    y = torch.randint(3, (n + 6,), generator=g)
    records = [{"x": x[i], "y": int(y[i])} for i in range(n + 6)]
    run = TrainConfig("sgd", lr=0.05, epochs=30, train_batch_size=6, momentum=0.9)
    return torch.nn.Sequential(*layers).double(), records[:n], records[n:], run


def test_magic_checks_its_smoothness_against_retraining(tmp_path):
    """Scores carry the check: βᵀd of the queries' mean loss against retraining with the weights
    1 + εd (d the check's seeded direction). A smooth run passes quietly; a ReLU run is flagged."""
    model, task, records, queries, _ = setup()
    eps = 0.01
    mean_loss = lambda m: task.loss(m, task.collate(queries)).mean()
    d = torch.randn(len(records), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    replay = Replay(model, task, records, RUNS["sgd"])
    beta, f = replay.metagradient(mean_loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = MAGIC(model, task, MagicConfig(run=RUNS["sgd"], smoothness_check=eps)).fit(records).score(queries)
    check = scores.diagnostics["smoothness"]
    assert check["predicted"] == pytest.approx(float(beta @ d.numpy()), rel=1e-10)
    assert check["finite_difference"] == pytest.approx((f_at(replay, 1 + eps * d, mean_loss) - f) / eps, rel=1e-10)
    assert check["relative_error"] < 0.01, check
    assert Scores.load(scores.save(tmp_path / "magic.safetensors")).diagnostics == scores.diagnostics

    model, records, queries, run = relu_run()
    with pytest.warns(UserWarning, match="not smooth in the records' weights"):
        scores = MAGIC(model, task, MagicConfig(run=run)).fit(records).score(queries)
    assert scores.diagnostics["smoothness"]["relative_error"] > 0.5
    skipped = MAGIC(model, task, MagicConfig(run=run, smoothness_check=0)).fit(records).score(queries)
    assert skipped.diagnostics == {}


def test_a_diverged_check_warns(monkeypatch):
    """A perturbed run that diverges gives a NaN error, which must warn (`nan > 0.1` is False)."""
    model, task, records, queries, _ = setup()
    diverged = lambda self, weights=None, **kw: {k: torch.full_like(v, torch.nan) for k, v in self.initial_state().items()}
    monkeypatch.setattr(Replay, "train", diverged)  # only the check trains; the metagradient replays step by step
    with pytest.warns(UserWarning, match="nan% apart"):
        scores = MAGIC(model, task, MagicConfig(run=RUNS["sgd"])).fit(records).score(queries)
    check = scores.diagnostics["smoothness"]
    assert np.isnan(check["relative_error"]) and np.isfinite(check["predicted"]) and np.isfinite(scores.values).all()


@pytest.mark.parametrize("name", ["tanh", "Tensor.tanh", "softmax", "softmax float64", "Tensor.softmax", "layer_norm", "layer_norm over two dims"])
def test_batchable_ops_equal_the_kernels_to_second_order(name, monkeypatch):
    """The elementary forms MAGIC's batched reverse pass uses have the kernels' values, gradients
    and second derivatives (float64; tanh at 0 and at ±40 included), and are the ones called."""
    import headwater.training as training

    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, dtype=torch.float64) * 4
    x[0, 0, :3] = torch.tensor([0.0, 40.0, -40.0])
    w, b, v = torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64), torch.randn_like(x)
    f = {
        "tanh": torch.tanh,
        "Tensor.tanh": lambda x: x.tanh(),
        "softmax": lambda x: F.softmax(x, dim=-1),
        "softmax float64": lambda x: F.softmax(x.float(), dim=1, dtype=torch.float64),
        "Tensor.softmax": lambda x: x.softmax(-1),
        "layer_norm": lambda x: F.layer_norm(x, (7,), w, b, 1e-5),
        "layer_norm over two dims": lambda x: F.layer_norm(x, (5, 7)),
    }[name]
    calls = []

    def counted(op):
        def call(*args, **kwargs):
            calls.append(op.__name__)
            return op(*args, **kwargs)

        return call

    for name_ in ("_tanh", "_softmax", "_layer_norm"):
        monkeypatch.setattr(training, name_, counted(getattr(training, name_)))

    def derivatives(batchable: bool):
        xx = x.clone().requires_grad_(True)
        with training.BatchableOps() if batchable else torch.enable_grad():
            y = f(xx)
            (g,) = torch.autograd.grad((y * v).sum(), xx, create_graph=True)
            (h,) = torch.autograd.grad((g * v).sum(), xx)
        return y.detach().double(), g.detach(), h

    for kernel, elementary in zip(derivatives(False), derivatives(True)):
        torch.testing.assert_close(elementary, kernel, rtol=1e-6 if name == "softmax float64" else 1e-12, atol=1e-12)
    assert calls, "the elementary form was not used"
