"""The one training loop (`Replay`) against torch.optim and the Hugging Face schedules."""

import numpy as np
import pytest
import torch
from reference import RUNS

from headwater import ModuleTask, Replay, TrainConfig
from headwater.collect import tracked_modules
from headwater.normalizer import load_optimizer_state, module_scales
from headwater.training import lr_at


def setup(n=24):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return model, ModuleTask(), [{"x": x[i], "y": int(y[i])} for i in range(n)]


def torch_optimizer(params, run: TrainConfig):
    if run.optimizer == "sgd":
        return torch.optim.SGD(params, lr=1.0, momentum=run.momentum, weight_decay=run.weight_decay, nesterov=run.nesterov)
    return torch.optim.AdamW(params, lr=1.0, betas=(run.beta1, run.beta2), eps=run.adam_eps, weight_decay=run.weight_decay)


@pytest.mark.parametrize("opt", ["sgd", "nesterov", "adamw"])
def test_replay_is_the_torch_optim_run(opt):
    """With all weights 1 the replayable loop is exactly the ordinary torch.optim training run."""
    model, task, records = setup()
    run = RUNS[opt]
    replay = Replay(model, task, records, run)
    final = replay.train()
    ref = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    ref.load_state_dict(model.state_dict())
    o = torch_optimizer(ref.parameters(), run)
    for t, idx in enumerate(replay.schedule):
        for group in o.param_groups:
            group["lr"] = replay.lr(t)
        o.zero_grad()
        task.loss(ref, task.collate([records[i] for i in idx])).mean().backward()
        if run.clip_norm:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), run.clip_norm)
        o.step()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(final[f"p.{n}"], p.detach(), rtol=1e-10, atol=1e-13)
    if opt == "adamw":  # and its optimizer state is torch's, as the normaliser reads it
        state = replay.optimizer_state(final)
        for i, p in enumerate(ref.parameters()):
            torch.testing.assert_close(state["state"][i]["exp_avg_sq"], o.state[p]["exp_avg_sq"], rtol=1e-10, atol=1e-16)


@pytest.mark.parametrize("schedule,warmup", [("constant", 0.1), ("linear", 0.0), ("linear", 0.25), ("cosine", 0.1)])
def test_schedules_are_the_hugging_face_ones(schedule, warmup):
    from transformers import get_scheduler

    total = 40
    config = TrainConfig(lr=0.5, schedule=schedule, warmup=warmup)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.5)
    name = "constant_with_warmup" if schedule == "constant" else schedule
    sched = get_scheduler(name, opt, num_warmup_steps=round(warmup * total), num_training_steps=total)
    want = []
    for _ in range(total):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose([lr_at(config, t, total) for t in range(total)], want, rtol=1e-12, atol=1e-15)


def test_optimizer_state_feeds_the_normaliser(tmp_path):
    model, task, records = setup()
    replay = Replay(model, task, records, RUNS["adamw"])
    final = replay.train()
    torch.save(replay.optimizer_state(final), tmp_path / "optimizer.pt")
    scales = module_scales(replay.load(final), tracked_modules(model), load_optimizer_state(tmp_path / "optimizer.pt"))
    v = final["v.0.weight"] / (1 - RUNS["adamw"].beta2 ** replay.steps)
    torch.testing.assert_close(scales["0"].full[:, :3], 1 / (v.sqrt() + 1e-8), rtol=1e-12, atol=0)
