"""MAGIC: exact metagradients of a measurement through a whole training run (arXiv 2504.16430).

Every training example i gets a weight w_i on its loss (w = 1 is the real run). The training run
is deterministic and replayable (`TrainingRun`: fixed data order, seeds, optimizer), so the final
parameters are a function θ_T(w) and the measurement f(θ_T(w)) can be differentiated exactly:

    adjoint λ_T = ∂f/∂s_T (s = parameters and optimizer state)
    for t = T-1 … 0:  β[batch_t] += λ_{t+1}ᵀ ∂s_{t+1}/∂w_t,   λ_t = (∂s_{t+1}/∂s_t)ᵀ λ_{t+1}

Each reverse step is one double-backward through the optimizer step. States are recomputed from
about √T checkpoints (memory: √T states plus one segment), costing one extra forward run.
With f a loss, upweighting a helpful example lowers f, so `scores` returns −β (positive = helps).
"""

from __future__ import annotations

import math
import warnings
import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
import torch
from torch.func import functional_call
from tqdm.auto import tqdm

from ..errors import UserError
from ..task import Task, encode_records

State = dict[str, torch.Tensor]  # "p.<name>", "m.<name>", "v.<name>"


@dataclass
class TrainingRun:
    """A deterministic training loop: the same settings give bit-identical runs.

    `lr` is a constant, a list (one value per step) or a function of the step. SGD uses heavy-ball
    momentum and coupled weight decay (as torch.optim.SGD); AdamW uses decoupled weight decay and
    bias correction (as torch.optim.AdamW). `clip_norm` clips the global gradient norm.
    """

    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float | list[float] | Callable[[int], float] = 0.1
    epochs: int = 1
    batch_size: int = 8
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float | None = None
    seed: int = 0
    drop_last: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.optimizer not in ("sgd", "adamw"):
            raise UserError(f"MAGIC supports optimizer 'sgd' or 'adamw', got {self.optimizer!r}")

    def batches(self, n: int) -> list[list[int]]:
        """The fixed order of example indices, one list per step."""
        g = torch.Generator().manual_seed(self.seed)
        out = []
        for _ in range(self.epochs):
            order = torch.randperm(n, generator=g).tolist()
            for i in range(0, n, self.batch_size):
                chunk = order[i : i + self.batch_size]
                if len(chunk) == self.batch_size or not self.drop_last:
                    out.append(chunk)
        return out

    def lr_at(self, t: int) -> float:
        if callable(self.lr):
            return float(self.lr(t))
        if isinstance(self.lr, (list, tuple)):
            return float(self.lr[t])
        return float(self.lr)


class _Bound(torch.nn.Module):
    """Calls `model` with the given parameter tensors (so tasks can call it as usual)."""

    def __init__(self, model: torch.nn.Module, params: dict[str, torch.Tensor]):
        super().__init__()
        self.__dict__["inner"], self.__dict__["params"] = model, params

    def forward(self, *args, **kwargs):
        return functional_call(self.inner, self.params, args, kwargs)


def _safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    """√v with gradient 0 (not inf) where v = 0, e.g. parameters no example has touched yet."""
    pos = v > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, v, torch.ones_like(v))), torch.zeros_like(v))


def _twice_differentiable_attention(model: torch.nn.Module) -> None:
    """Fused attention kernels (SDPA/flash on CPU) have no double backward, which the reverse
    pass needs; eager attention computes the same function and has one."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl not in (None, "eager"):
        warnings.warn(f"MAGIC switches the model's attention from {impl!r} to 'eager' (needs double backward)", stacklevel=3)
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")
        else:
            config._attn_implementation = "eager"


class Trainer:
    """Runs `TrainingRun` functionally on `model`'s trainable parameters with per-example weights."""

    def __init__(self, model: torch.nn.Module, task: Task, records, run: TrainingRun):
        self.model, self.task, self.run = model, task, run
        _twice_differentiable_attention(model)
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.examples = encode_records(task, records)
        if len(self.examples) != len(records):
            raise UserError("MAGIC needs one example per record (document units)")
        self.schedule = run.batches(len(self.examples))
        self.buffers = {n: b for n, b in model.named_buffers()}

    def initial_state(self) -> State:
        params = dict(self.model.named_parameters())
        s = {f"p.{n}": params[n].detach().clone() for n in self.names}
        if self.run.optimizer == "adamw" or self.run.momentum:
            s.update({f"m.{n}": torch.zeros_like(params[n]) for n in self.names})
        if self.run.optimizer == "adamw":
            s.update({f"v.{n}": torch.zeros_like(params[n]) for n in self.names})
        return s

    def step(self, s: State, t: int, w: torch.Tensor, create_graph: bool = False) -> State:
        """One optimizer step t with example weights w [batch] (differentiable when create_graph)."""
        run, lr = self.run, self.run.lr_at(t)
        idx = self.schedule[t]
        batch = self.task.collate([self.examples[i] for i in idx])
        params = {n: s[f"p.{n}"] for n in self.names}
        if not create_graph:  # a plain step: fresh leaves, and detached results below
            params = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        with torch.enable_grad():
            losses = self.task.per_example_loss(_Bound(self.model, {**params, **self.buffers}), batch)
            loss = (w * losses).sum() / len(idx)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
        if run.clip_norm is not None:
            norm = torch.sqrt(sum((g**2).sum() for g in grads))
            scale = torch.clamp(run.clip_norm / (norm + 1e-6), max=1.0)
            grads = [g * scale for g in grads]
        out: State = {}
        for n, g in zip(self.names, grads):
            p = params[n]
            if run.optimizer == "sgd":
                if run.weight_decay:
                    g = g + run.weight_decay * p
                if run.momentum:
                    g = out[f"m.{n}"] = run.momentum * s[f"m.{n}"] + g
                out[f"p.{n}"] = p - lr * g
            else:
                b1, b2 = run.betas
                m = out[f"m.{n}"] = b1 * s[f"m.{n}"] + (1 - b1) * g
                v = out[f"v.{n}"] = b2 * s[f"v.{n}"] + (1 - b2) * g * g
                m_hat, v_hat = m / (1 - b1 ** (t + 1)), v / (1 - b2 ** (t + 1))
                out[f"p.{n}"] = p * (1 - lr * run.weight_decay) - lr * m_hat / (_safe_sqrt(v_hat) + run.eps)
        return out if create_graph else {k: v.detach() for k, v in out.items()}

    def weights_for(self, w: torch.Tensor, t: int) -> torch.Tensor:
        return w[self.schedule[t]]

    def train(self, weights: torch.Tensor | None = None, progress: bool = False) -> State:
        """The final state of the run with example weights (default all ones)."""
        w = torch.ones(len(self.examples), dtype=self._dtype()) if weights is None else weights
        s = self.initial_state()
        for t in tqdm(range(len(self.schedule)), desc="train", disable=not progress):
            s = self.step(s, t, self.weights_for(w, t))
        return s

    def trajectory(self, steps: list[int], weights: torch.Tensor | None = None) -> dict[int, State]:
        """States after each of `steps` optimizer steps (0 = the initial state), for TracIn/SOURCE."""
        w = torch.ones(len(self.examples), dtype=self._dtype()) if weights is None else weights
        s, out = self.initial_state(), {}
        for t in range(max(steps) + 1):
            if t in steps:
                out[t] = s
            if t < len(self.schedule):
                s = self.step(s, t, self.weights_for(w, t))
        return out

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def load(self, s: State) -> torch.nn.Module:
        """Copy the parameters of state `s` into the model (returns it)."""
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if f"p.{n}" in s:
                    p.copy_(s[f"p.{n}"])
        return self.model

    def measure(self, s: State, measurement: Callable[[torch.nn.Module], torch.Tensor]) -> torch.Tensor:
        """`measurement(model)` evaluated at state `s` (differentiable in the state)."""
        params = {n: s[f"p.{n}"] for n in self.names}
        return measurement(_Bound(self.model, {**params, **self.buffers}))

    def metagradient(self, measurement: Callable[[torch.nn.Module], torch.Tensor], checkpoint_every: int | None = None, progress: bool = False) -> tuple[np.ndarray, float]:
        """(∂f/∂w at w = 1 [n_examples], f) for a scalar measurement f of the final model."""
        T = len(self.schedule)
        k = checkpoint_every or max(1, math.isqrt(T))
        ones = torch.ones(len(self.examples), dtype=self._dtype())
        checkpoints = {}
        s = self.initial_state()
        for t in range(T):
            if t % k == 0:
                checkpoints[t] = s
            s = self.step(s, t, self.weights_for(ones, t))
        final = {key: v.detach().requires_grad_(True) for key, v in s.items()}
        with torch.enable_grad():
            f = self.measure(final, measurement)
            lam = dict(zip(final, torch.autograd.grad(f, list(final.values()), allow_unused=True)))
        lam = {key: torch.zeros_like(final[key]) if g is None else g for key, g in lam.items()}
        beta = torch.zeros(len(self.examples), dtype=torch.float64)
        bar = tqdm(total=T, desc="MAGIC reverse", disable=not progress)
        for start in sorted(checkpoints, reverse=True):
            stop = min(T, start + k)
            states = [checkpoints[start]]
            for t in range(start, stop - 1):  # replay the segment
                states.append(self.step(states[-1], t, self.weights_for(ones, t)))
            for t in range(stop - 1, start - 1, -1):
                s_t = {key: v.detach().requires_grad_(True) for key, v in states[t - start].items()}
                w_t = self.weights_for(ones, t).clone().requires_grad_(True)
                with torch.enable_grad():
                    s_next = self.step(s_t, t, w_t, create_graph=True)
                    keys = [key for key in s_next if key in lam]
                    inputs = list(s_t.values()) + [w_t]
                    grads = torch.autograd.grad([s_next[key] for key in keys], inputs, [lam[key] for key in keys], allow_unused=True)
                beta[self.schedule[t]] += grads[-1].detach().double()
                lam = {key: torch.zeros_like(s_t[key]) if g is None else g.detach() for key, g in zip(s_t, grads[:-1])}
                bar.update(1)
        bar.close()
        return beta.numpy(), float(f.detach())

    def metasmoothness(self, measurement, direction: torch.Tensor | None = None, eps: float = 1e-3, seed: int = 0) -> dict:
        """Compare βᵀd with a central finite difference of f along d (default: a random direction).

        A small relative error means training is smooth enough in w for the metagradient to
        predict what reweighting (and, to first order, removal) does.
        """
        n = len(self.examples)
        if direction is None:
            direction = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=self._dtype())
        beta, _ = self.metagradient(measurement)
        predicted = float(np.dot(beta, direction.double().numpy()))
        f = lambda w: float(self.measure(self.train(w), measurement))
        ones = torch.ones(n, dtype=self._dtype())
        fd = (f(ones + eps * direction) - f(ones - eps * direction)) / (2 * eps)
        return {"predicted": predicted, "finite_difference": fd, "relative_error": abs(predicted - fd) / max(abs(fd), 1e-30)}


def magic_scores(model: torch.nn.Module, task: Task, records, run: TrainingRun, measurement, seeds: list[int] | None = None, progress: bool = False) -> np.ndarray:
    """MAGIC scores [n_train]: −∂f/∂w_i (positive = up-weighting example i lowers the loss f).

    `model` holds the initial parameters (θ_0) of the run; `measurement(model)` is the query loss
    (e.g. the mean loss over the queries: averaging first costs one run for any number of queries).
    The metagradient is exact for the one deterministic run it differentiates; `seeds` averages it
    over runs with those data-order seeds, which matches a target averaged over training seeds
    (benchmarks/lds.py: a single run's MAGIC scores its own run's subsets far better than another
    seed's, 0.79 vs 0.71 LDS at α = 0.5 on the tabular task).
    """
    seeds = [run.seed] if seeds is None else seeds
    total = 0.0
    for seed in seeds:
        beta, _ = Trainer(model, task, records, dataclasses.replace(run, seed=seed)).metagradient(measurement, progress=progress)
        total = total - beta / len(seeds)
    return np.asarray(total)
