"""MAGIC's metagradient against finite differences of real retraining, and against torch.optim."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from headwater.methods.magic import Trainer, TrainingRun, magic_scores
from headwater.task import ClassificationTask

RUNS = {
    "sgd": TrainingRun("sgd", lr=[0.3, 0.3, 0.2, 0.2, 0.1, 0.1, 0.05, 0.05], epochs=2, batch_size=6, momentum=0.9, weight_decay=1e-2, clip_norm=2.0, seed=1),
    "adamw": TrainingRun("adamw", lr=lambda t: 0.03 * (1 - t / 8), epochs=2, batch_size=6, betas=(0.9, 0.99), weight_decay=0.05, seed=2),
}


def setup(n=24):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n + 6, 3, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    records = [{"x": x[i], "y": int(y[i])} for i in range(n)]
    qx, qy = x[n:], y[n:]
    measurement = lambda m: F.cross_entropy(m(qx), qy)
    return model, ClassificationTask(dtype=torch.float64), records, measurement


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_metagradient_matches_finite_differences_of_retraining(opt):
    model, task, records, measurement = setup()
    trainer = Trainer(model, task, records, RUNS[opt])
    beta, f = trainer.metagradient(measurement, checkpoint_every=3)
    assert f == pytest.approx(float(trainer.measure(trainer.train(), measurement)))
    eps = 1e-5
    for i in (0, 7, 19):
        w = torch.ones(len(records), dtype=torch.float64)
        w[i] += eps
        up = float(trainer.measure(trainer.train(w), measurement))
        w[i] -= 2 * eps
        down = float(trainer.measure(trainer.train(w), measurement))
        fd = (up - down) / (2 * eps)
        assert beta[i] == pytest.approx(fd, rel=1e-2, abs=1e-9), (i, beta[i], fd)


def test_checkpoint_spacing_does_not_change_the_result():
    model, task, records, measurement = setup()
    trainer = Trainer(model, task, records, RUNS["adamw"])
    a, _ = trainer.metagradient(measurement, checkpoint_every=1)
    b, _ = trainer.metagradient(measurement, checkpoint_every=5)
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_functional_run_is_the_torch_optim_run(opt):
    """With all weights 1 the replayable loop is exactly the ordinary torch.optim training run."""
    model, task, records, _ = setup()
    run = RUNS[opt]
    trainer = Trainer(model, task, records, run)
    final = trainer.train()
    ref = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    ref.load_state_dict(model.state_dict())
    if opt == "sgd":
        o = torch.optim.SGD(ref.parameters(), lr=1.0, momentum=run.momentum, weight_decay=run.weight_decay)
    else:
        o = torch.optim.AdamW(ref.parameters(), lr=1.0, betas=run.betas, eps=run.eps, weight_decay=run.weight_decay)
    for t, idx in enumerate(run.batches(len(records))):
        for group in o.param_groups:
            group["lr"] = run.lr_at(t)
        batch = task.collate([task.encode(records[i])[0] for i in idx])
        o.zero_grad()
        task.per_example_loss(ref, batch).mean().backward()
        if run.clip_norm:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), run.clip_norm)
        o.step()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(final[f"p.{n}"], p.detach(), rtol=1e-6, atol=1e-9)


def test_scores_follow_the_sign_convention_and_metasmoothness():
    model, task, records, measurement = setup()
    trainer = Trainer(model, task, records, RUNS["sgd"])
    scores = magic_scores(model, task, records, RUNS["sgd"], measurement)
    beta, _ = trainer.metagradient(measurement)
    np.testing.assert_allclose(scores, -beta)
    check = trainer.metasmoothness(measurement, eps=1e-4)
    assert check["relative_error"] < 1e-3, check


def test_metagradient_through_a_tiny_gpt2(tokenizer):
    """Language models too: fused attention is switched to eager (double backward) and the
    metagradient matches finite differences of retraining."""
    from headwater.task import LanguageModelTask
    from headwater.toy import tiny_gpt2

    texts = ["the capital of zorblat is quenti", "mirel is a large old city", "the river of vask is blue",
             "tela was a small red mountain", "orin is in the south", "the city is old and famous"]
    records = [{"text": t} for t in texts]
    torch.manual_seed(0)
    model = tiny_gpt2(len(tokenizer), n_layer=1, n_embd=16, n_head=2, n_positions=32).double()
    task = LanguageModelTask(tokenizer)
    run = TrainingRun("adamw", lr=0.02, epochs=2, batch_size=3, weight_decay=0.01, seed=0)
    with pytest.warns(UserWarning, match="eager"):
        trainer = Trainer(model, task, records, run)
    query = task.collate(task.encode({"prompt": "the capital of zorblat is", "completion": " quenti"}))
    measurement = lambda m: task.per_example_loss(m, query).sum()
    beta, _ = trainer.metagradient(measurement)
    eps = 1e-4
    for i in (0, 3):
        w = torch.ones(len(records), dtype=torch.float64)
        w[i] += eps
        up = float(trainer.measure(trainer.train(w), measurement))
        w[i] -= 2 * eps
        down = float(trainer.measure(trainer.train(w), measurement))
        assert beta[i] == pytest.approx((up - down) / (2 * eps), rel=1e-2)


def test_seed_ensemble_is_the_mean_of_single_runs():
    model, task, records, measurement = setup()
    run = RUNS["sgd"]
    a = magic_scores(model, task, records, dataclasses.replace(run, seed=3), measurement)
    b = magic_scores(model, task, records, dataclasses.replace(run, seed=4), measurement)
    both = magic_scores(model, task, records, run, measurement, seeds=[3, 4])
    np.testing.assert_allclose(both, (a + b) / 2, rtol=1e-12)
    assert not np.allclose(a, b)  # another data order is another run
