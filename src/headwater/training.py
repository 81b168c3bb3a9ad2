"""The one training loop: a deterministic, replayable run with a weight on every example's loss.

`Replay(model, task, records, TrainConfig(...))` runs the recipe functionally on the model's
trainable parameters: a fixed data order from `data_seed`, the optimizer written out (SGD with
heavy-ball or Nesterov momentum and coupled decay as torch.optim.SGD; AdamW with bias correction and
decoupled decay as torch.optim.AdamW), the learning-rate schedule of the Hugging Face Trainer
(linear warm-up from 0, then constant, linear or cosine decay to 0), optional global-norm
clipping. The same settings give bit-identical runs, so MAGIC can differentiate through one,
retraining can replay it on subsets, and the demos train with it.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.overrides import TorchFunctionMode
from tqdm.auto import tqdm

from .config import TrainConfig
from .errors import UserError
from .task import Task, whole_examples

State = dict[str, torch.Tensor]  # "p.<name>" parameters, "m.<name>" / "v.<name>" optimizer moments


def lr_at(config: TrainConfig, t: int, total: int) -> float:
    """The learning rate of step t (0-based) of a `total`-step run."""
    if config.lr_per_step is not None:
        return float(config.lr_per_step[t])
    warm = int(round(config.warmup * total))
    if t < warm:
        return config.lr * t / max(1, warm)
    if config.schedule == "constant":
        return config.lr
    progress = (t - warm) / max(1, total - warm)
    if config.schedule == "linear":
        return config.lr * max(0.0, 1.0 - progress)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


class Bound(torch.nn.Module):
    """Calls `model` with the given parameter (and buffer) tensors, so tasks can call it as usual."""

    def __init__(self, model: torch.nn.Module, params: dict[str, torch.Tensor]):
        super().__init__()
        self.__dict__["inner"], self.__dict__["params"] = model, params

    def forward(self, *args, **kwargs):
        return functional_call(self.inner, self.params, args, kwargs)

    def named_modules(self, *args, **kwargs):  # measurements that hook a layer find the real one
        return self.inner.named_modules(*args, **kwargs)


def _safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    """√v with gradient 0 (not inf) where v = 0, e.g. parameters no example has touched yet.

    Masks by multiplication, not `torch.where`: MAGIC's batched reverse pass differentiates this
    twice under vmap, where `where`'s backward falls back to a loop over the queries (q = 100
    cost 7.5× q = 1 on the tiny GPT-2; 5.2× with the mask, benchmarks/magic.py)."""
    pos = (v > 0).to(v.dtype)
    return torch.sqrt(v * pos + (1 - pos)) * pos


class BatchableOps(TorchFunctionMode):
    """tanh, softmax and layer norm computed from elementary ops (exp, sums, products).

    MAGIC's reverse pass takes each step's vector-Jacobian products for all queries at once under
    vmap (`is_grads_batched`); the double backward of the fused kernels (`tanh_backward`, the
    softmax and layer-norm backwards) has no batching rule there and runs one query at a time.
    These are the same functions; their derivatives differ from the kernels' by rounding."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tanh, torch.Tensor.tanh) and not kwargs:
            return _tanh(args[0])
        if func in (F.softmax, torch.softmax, torch.Tensor.softmax):
            dim, dtype = kwargs.get("dim", args[1] if len(args) > 1 else None), kwargs.get("dtype")
            if dim is not None and len(args) <= 2 and set(kwargs) <= {"dim", "dtype", "_stacklevel"}:  # else (rare forms) the kernel
                return _softmax(args[0] if dtype is None else args[0].to(dtype), dim)
        if func is F.layer_norm:
            return _layer_norm(*args, **kwargs)
        return func(*args, **kwargs)


def _tanh(y: torch.Tensor) -> torch.Tensor:
    s = 1 - 2 * (y < 0).to(y.dtype)  # ±1, even at 0, so the derivative there is 1
    e = torch.exp(-2 * s * y)  # never overflows
    return s * (1 - e) / (1 + e)


def _softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    e = torch.exp(x - x.amax(dim, keepdim=True).detach())
    return e / e.sum(dim, keepdim=True)


def _layer_norm(x: torch.Tensor, normalized_shape, weight=None, bias=None, eps: float = 1e-5) -> torch.Tensor:
    dims = tuple(range(-len(normalized_shape), 0))
    centred = x - x.mean(dims, keepdim=True)
    out = centred * torch.rsqrt((centred * centred).mean(dims, keepdim=True) + eps)
    out = out * weight if weight is not None else out
    return out + bias if bias is not None else out


def twice_differentiable_attention(model: torch.nn.Module) -> None:
    """Fused attention kernels (SDPA/flash on CPU) have no double backward, which a reverse pass
    through training needs; eager attention computes the same function and has one."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl not in (None, "eager"):
        warnings.warn(f"switching the model's attention from {impl!r} to 'eager' (a double backward is needed)", stacklevel=3)
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")
        else:
            config._attn_implementation = "eager"


class Replay:
    """Runs `config` on `model`'s trainable parameters over `records`, with per-example weights."""

    def __init__(self, model: torch.nn.Module, task: Task, records, config: TrainConfig):
        self.model, self.task, self.config = model, task, config
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        if not self.names:
            raise UserError("the model has no trainable parameters")
        self.examples = whole_examples(task, records)
        self.schedule = self.batches(len(self.examples))
        if config.lr_per_step is not None and len(config.lr_per_step) < len(self.schedule):
            raise UserError(f"lr_per_step has {len(config.lr_per_step)} values for a run of {len(self.schedule)} steps")
        self.buffers = dict(model.named_buffers())

    def batches(self, n: int) -> list[list[int]]:
        """The fixed order of example indices, one list per step."""
        g = torch.Generator().manual_seed(self.config.data_seed)
        out, size = [], self.config.train_batch_size
        for _ in range(self.config.epochs):
            order = torch.randperm(n, generator=g).tolist()
            for i in range(0, n, size):
                chunk = order[i : i + size]
                if len(chunk) == size or not self.config.drop_last:
                    out.append(chunk)
        return out

    @property
    def steps(self) -> int:
        return len(self.schedule)

    def lr(self, t: int) -> float:
        return lr_at(self.config, t, self.steps)

    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def ones(self) -> torch.Tensor:
        return torch.ones(len(self.examples), dtype=self.dtype())

    def initial_state(self) -> State:
        params = dict(self.model.named_parameters())
        s = {f"p.{n}": params[n].detach().clone() for n in self.names}
        if self.config.optimizer == "adamw" or self.config.momentum:
            s.update({f"m.{n}": torch.zeros_like(params[n]) for n in self.names})
        if self.config.optimizer == "adamw":
            s.update({f"v.{n}": torch.zeros_like(params[n]) for n in self.names})
        return s

    def bind(self, s: State) -> Bound:
        """The model evaluated at state `s` (differentiable in the state)."""
        return Bound(self.model, {**{n: s[f"p.{n}"] for n in self.names}, **self.buffers})

    def step(self, s: State, t: int, w: torch.Tensor, create_graph: bool = False) -> State:
        """One optimizer step t with example weights w [batch] (differentiable when create_graph)."""
        cfg, lr = self.config, self.lr(t)
        idx = self.schedule[t]
        batch = self.task.collate([self.examples[i] for i in idx])
        params = {n: s[f"p.{n}"] for n in self.names}
        if not create_graph:  # a plain step: fresh leaves, and detached results below
            params = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        with torch.enable_grad():
            losses = self.task.loss(Bound(self.model, {**params, **self.buffers}), batch)
            loss = (w * losses).sum() / self.loss_normaliser(idx, batch)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
        grads = self.clip(t, grads)
        out: State = {}
        for n, g in zip(self.names, grads):
            p, decay = params[n], self.weight_decay(n)
            if cfg.optimizer == "sgd":
                if decay:
                    g = g + decay * p
                if cfg.momentum:
                    buf = out[f"m.{n}"] = cfg.momentum * s[f"m.{n}"] + g
                    g = g + cfg.momentum * buf if cfg.nesterov else buf
                out[f"p.{n}"] = p - lr * g
            else:
                b1, b2, count = cfg.beta1, cfg.beta2, self.count(t)
                m = out[f"m.{n}"] = b1 * s[f"m.{n}"] + (1 - b1) * g
                v = out[f"v.{n}"] = b2 * s[f"v.{n}"] + (1 - b2) * g * g
                m_hat, v_hat = m / (1 - b1**count), v / (1 - b2**count)
                out[f"p.{n}"] = p * (1 - lr * decay) - lr * m_hat / (_safe_sqrt(v_hat) + cfg.adam_eps)
        return out if create_graph else {k: v.detach() for k, v in out.items()}

    # What a replay of a recorded run (`stages.StageReplay`) takes from the recording instead:
    def loss_normaliser(self, idx: list[int], batch: dict) -> int:
        """What a step's summed loss is divided by: its examples."""
        return len(idx)

    def clip(self, t: int, grads: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Step t's gradients after `clip_norm` (their global norm clipped)."""
        if self.config.clip_norm is None:
            return grads
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        scale = torch.clamp(self.config.clip_norm / (norm + 1e-6), max=1.0)
        return tuple(g * scale for g in grads)

    def weight_decay(self, name: str) -> float:
        """Parameter `name`'s weight decay (SGD: coupled; AdamW: decoupled)."""
        return self.config.weight_decay

    def count(self, t: int) -> int:
        """AdamW's step count at step t (its bias correction)."""
        return t + 1

    def weights_for(self, w: torch.Tensor, t: int) -> torch.Tensor:
        return w[self.schedule[t]]

    def train(self, weights: torch.Tensor | None = None, progress: bool = False, desc: str = "train") -> State:
        """The final state of the run with example weights (default all ones)."""
        w = self.ones() if weights is None else weights
        s = self.initial_state()
        for t in tqdm(range(self.steps), desc=desc, disable=not progress):
            s = self.step(s, t, self.weights_for(w, t))
        return s

    def trajectory(self, steps: list[int], weights: torch.Tensor | None = None) -> dict[int, State]:
        """States after each of `steps` optimizer steps (0 = the initial state), for TracIn/SOURCE."""
        w = self.ones() if weights is None else weights
        s, out = self.initial_state(), {}
        for t in range(max(steps) + 1):
            if t in steps:
                out[t] = s
            if t < self.steps:
                s = self.step(s, t, self.weights_for(w, t))
        return out

    def optimizer_state(self, s: State) -> dict:
        """The run's optimizer state at `s` in `torch.optim`'s state_dict layout (parameter
        indexes in model order, param_names given), e.g. for `--optimizer-state`."""
        cfg, state = self.config, {}
        for i, n in enumerate(self.names):
            entry = {"step": torch.tensor(float(self.steps))}
            if f"m.{n}" in s:
                entry["momentum_buffer" if cfg.optimizer == "sgd" else "exp_avg"] = s[f"m.{n}"].clone()
            if f"v.{n}" in s:
                entry["exp_avg_sq"] = s[f"v.{n}"].clone()
            state[i] = entry
        group = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "params": list(range(len(self.names))), "param_names": list(self.names)}
        group.update(
            {"betas": (cfg.beta1, cfg.beta2), "eps": cfg.adam_eps}
            if cfg.optimizer == "adamw"
            else {"momentum": cfg.momentum, "nesterov": cfg.nesterov}
        )
        return {"state": state, "param_groups": [group]}

    def load(self, s: State) -> torch.nn.Module:
        """Copy the parameters of state `s` into the model (returns it)."""
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if f"p.{n}" in s:
                    p.copy_(s[f"p.{n}"])
        return self.model

    def metagradient(
        self, measure: Callable[[torch.nn.Module], torch.Tensor], checkpoint_every: int | None = None, progress: bool = False
    ) -> tuple[np.ndarray, np.ndarray | float]:
        """(∂f/∂w at w = 1, f) for f = `measure(model)` of the final model: a scalar (β [n]) or a
        vector of q measurements (β [n, q]), all carried through one reverse pass.

        The reverse pass carries the adjoint of the state backwards one step at a time (a
        double-backward through the step), recomputing states from checkpoints kept every
        `checkpoint_every` steps (default √T): memory √T states, cost one extra forward run.
        For q measurements the adjoints are a batch: each step's vector-Jacobian products run
        vectorised over them (`is_grads_batched`), so q queries cost far less than q passes.
        """
        twice_differentiable_attention(self.model)
        T = self.steps
        k = checkpoint_every or max(1, math.isqrt(T))
        ones = self.ones()
        checkpoints = {}
        s = self.initial_state()
        for t in range(T):
            if t % k == 0:
                checkpoints[t] = s
            s = self.step(s, t, self.weights_for(ones, t))
        final = {key: v.detach().requires_grad_(True) for key, v in s.items()}
        with torch.enable_grad():
            f = measure(self.bind(final))
            batched = f.dim() == 1
            seed = torch.eye(len(f), dtype=f.dtype) if batched else None
            grads = torch.autograd.grad(f, list(final.values()), seed, allow_unused=True, is_grads_batched=batched)
        shape = lambda v: (len(f), *v.shape) if batched else v.shape
        lam = {key: torch.zeros(shape(final[key]), dtype=final[key].dtype) if g is None else g for key, g in zip(final, grads)}
        beta = torch.zeros((len(self.examples), len(f)) if batched else len(self.examples), dtype=torch.float64)
        bar = tqdm(total=T, desc="MAGIC reverse", disable=not progress)
        for start in sorted(checkpoints, reverse=True):
            stop = min(T, start + k)
            states = [checkpoints[start]]
            for t in range(start, stop - 1):  # replay the segment
                states.append(self.step(states[-1], t, self.weights_for(ones, t)))
            for t in range(stop - 1, start - 1, -1):
                s_t = {key: v.detach().requires_grad_(True) for key, v in states[t - start].items()}
                w_t = self.weights_for(ones, t).clone().requires_grad_(True)
                with torch.enable_grad(), BatchableOps() if batched else contextlib.nullcontext():
                    s_next = self.step(s_t, t, w_t, create_graph=True)
                    keys = [key for key in s_next if key in lam]
                    grads = torch.autograd.grad(
                        [s_next[key] for key in keys],
                        list(s_t.values()) + [w_t],
                        [lam[key] for key in keys],
                        allow_unused=True,
                        is_grads_batched=batched,
                    )
                g_w = grads[-1].detach().double()
                # index_add_, not +=: a recorded batch (StageReplay) may hold a record twice
                beta.index_add_(0, torch.as_tensor(self.schedule[t]), g_w.T if batched else g_w)
                lam = {key: torch.zeros(shape(s_t[key]), dtype=s_t[key].dtype) if g is None else g.detach() for key, g in zip(s_t, grads[:-1])}
                bar.update(1)
        bar.close()
        return beta.numpy(), f.detach().numpy() if batched else float(f.detach())

    def metasmoothness(self, measure, *, eps: float = 1e-2, seed: int = 0, metagradient: tuple | None = None) -> dict:
        """Compare βᵀd with the finite difference (f(w + εd) − f(w)) / ε along a random direction
        d ~ N(0, I) of the records' weights, f the mean of `measure` (scalar or [q]; for MAGIC the
        objective, i.e. the measurement counted downwards).

        A small relative error means training is smooth enough in w for the metagradient to
        predict what reweighting (and, to first order, removal) does. ReLU kinks, Adam's first
        steps and training at the edge of stability make it large: the derivative is exact, but
        describes the run only over a tiny neighbourhood. A run that diverges gives NaN.
        `metagradient` reuses a computed (β, f) of the same `measure`, so the check costs one
        more training run.
        """
        beta, f = metagradient or self.metagradient(measure)
        beta = np.asarray(beta).reshape(len(self.examples), -1).mean(1)
        d = torch.randn(len(self.examples), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        weights = self.ones() + eps * d.to(self.dtype())
        # the direction the run was given, after rounding to the model's dtype (bfloat16 moves it by ~20%)
        predicted = float(np.dot(beta, ((weights.double() - 1) / eps).numpy()))
        fd = (float(measure(self.bind(self.train(weights))).mean()) - float(np.mean(f))) / eps
        error = abs(predicted - fd) / max(abs(fd), 1e-30) if math.isfinite(fd) else math.nan
        return {"eps": eps, "predicted": predicted, "finite_difference": fd, "relative_error": error}
