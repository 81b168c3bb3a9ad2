"""Independent references shared by the tests: autograd one example at a time, dense matrices,
tiny models and data, and the in-process command line. Tests import these helpers from here,
never from each other.

Comparisons against autograd run in float64 where the reference allows it: batched and
one-at-a-time passes use different kernels, whose float32 round-off (~1e-7 relative, CPU
dependent) says nothing about the method."""

import copy
import dataclasses

import torch
import torch.nn.functional as F

from headwater.collect import tracked_modules
from headwater.config import TrainConfig
from headwater.projection import project
from headwater.task import TokenExample

F64 = 1e-10  # relative tolerance of float64 comparisons (round-off ~1e-16 through a few layers)
STORED_F32 = 2**-23  # float64 rows stored as float32: each entry rounded by at most 2^-24 relative


def assert_rel_close(got, want, tol=F64):
    """Every row of `got` within relative distance `tol` of `want`'s."""
    err = (got.double() - want.double()).norm(dim=1) / want.double().norm(dim=1).clamp_min(1e-30)
    assert err.max().item() < tol, err


def module_gradient(tm) -> torch.Tensor:
    """A tracked module's current .grad as [d_out, d_in(+1)], bias as the last column."""
    w = tm.module.weight.grad
    w = w.T if tm.transposed else w.reshape(w.shape[0], -1)  # Conv2d [C_out, C_in, kh, kw] -> [C_out, C_in·kh·kw]
    return torch.cat([w, tm.module.bias.grad[:, None]], 1) if tm.has_bias else w.clone()


def untied(model):
    """A copy whose weights shared between modules (GPT-2's head and token embedding) are separate
    parameters."""
    model = copy.deepcopy(model)
    seen = {}
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.nn.Parameter):
            if w.data_ptr() in seen:
                module.weight = torch.nn.Parameter(w.detach().clone())
            seen[w.data_ptr()] = name
    return model


def per_example_grads(model, task, examples, modules=None, loss=None):
    """{module name: [B, d_out, d_in(+1)]} autograd gradients of each example alone (of the
    module's weight parameter, every use of a shared weight included)."""
    tracked = tracked_modules(model, modules)
    loss = loss or task.loss
    out = {name: [] for name in tracked}
    for ex in examples:
        model.zero_grad()
        loss(model, task.collate([ex])).sum().backward()
        for name, tm in tracked.items():
            out[name].append(module_gradient(tm))
    model.zero_grad()
    return {name: torch.stack(gs) for name, gs in out.items()}


def reference_rows(model, task, examples, cfg, modules=None, scales=None, loss=None):
    """Autograd on each example alone, then the same projection applied to the full gradient."""
    grads = per_example_grads(model, task, examples, modules, loss)
    segs = []
    for name, g in grads.items():
        if scales is not None:
            g = g * scales[name].full.to(g)
        segs.append(project(cfg, name, g))
    return torch.cat(segs, 1)


def prefix_examples(example: TokenExample) -> list[TokenExample]:
    """Each target token of `example` as its own example: the prefix ending at it, loss on it alone."""
    out = []
    for t, m in enumerate(example.target_mask):
        if m and t > 0:
            out.append(TokenExample(example.input_ids[: t + 1], [False] * t + [True]))
    return out


def mlp(d_in=6, hidden=16, classes=3, seed=1, bias=True, dtype=torch.float64):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d_in, hidden, bias=bias), torch.nn.Tanh(), torch.nn.Linear(hidden, classes, bias=False)).to(dtype)


def mlp_records(n=6, d_in=6, classes=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(d_in, generator=g, dtype=dtype), "y": i % classes} for i in range(n)]


def cnn(seed=1, dtype=torch.float64):
    """Convolutions with padding, stride, dilation ("same"), no bias, and a Linear head."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1),
        torch.nn.Tanh(),
        torch.nn.Conv2d(4, 5, 3, stride=2, padding=1, bias=False),
        torch.nn.Tanh(),
        torch.nn.Conv2d(5, 3, (3, 1), padding="same", dilation=2),
        torch.nn.Flatten(),
        torch.nn.Linear(3 * 4 * 4, 3),
    ).to(dtype)


def image_records(n=6, side=7, classes=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(2, side, side, generator=g, dtype=dtype), "y": i % classes} for i in range(n)]


def ce(model, batch):
    """A user-written per-example loss (cross-entropy on `x`, `y`)."""
    return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


RUNS = {  # replayable training runs of 8 steps over 24 records (sgd: explicit per-step rates)
    "sgd": TrainConfig(
        "sgd",
        lr_per_step=[0.3, 0.3, 0.2, 0.2, 0.1, 0.1, 0.05, 0.05],
        epochs=2,
        train_batch_size=6,
        momentum=0.9,
        weight_decay=1e-2,
        clip_norm=2.0,
        data_seed=1,
    ),
    "adamw": TrainConfig("adamw", lr=0.03, schedule="linear", epochs=2, train_batch_size=6, beta2=0.99, weight_decay=0.05, data_seed=2),
}
RUNS["nesterov"] = dataclasses.replace(RUNS["sgd"], nesterov=True)


def run_cli(cwd, *args, code=0):
    """The command line, in this process (the same code path as `python -m headwater`, less the
    interpreter start-up), run in `cwd`; `r.stdout` and `r.stderr` as a subprocess would give them."""
    import os

    from typer.testing import CliRunner

    from headwater.cli import app

    before = os.getcwd()
    os.chdir(cwd)
    try:
        r = CliRunner().invoke(app, [str(a) for a in args])
    finally:
        os.chdir(before)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    assert r.exit_code == code, r.stderr[-2000:]
    return r
