"""Per-example gradients of tracked linear modules, compressed as they are computed.

For a linear module with per-token input a_t [d_in] and output gradient δ_t [d_out], example
b's weight gradient (bias as the last column) is DW_b = Σ_t δ_{b,t} [a_{b,t}; 1]ᵀ. Forward hooks
keep each call's input and output; one `torch.autograd.grad` of Σ_b L_b with respect to those
outputs gives every δ (parameter `.grad` is never touched), and examples do not mix because the
summed loss's gradient at example b's positions depends only on L_b. The factored projection then
needs only P_out δ_t and P_in a_t (LoGra); `dense`/`none` form DW_b explicitly.

A 2-d convolution is the same linear map applied at every output position to the input patch
there: a_t is the unfolded patch [C_in·kh·kw] and δ_t the output gradient [C_out] at position t,
and DW_b (the weight viewed as [C_out, C_in·kh·kw]) has the same form, so everything downstream
(projections, KFAC factors, normalisers) treats positions as it treats tokens.

An output head tied to the token embedding (GPT-2) has one weight W [V, d] used twice: by the
head and by the embedding lookup e_t = W[x_t]. The lookup is the same linear form with the roles
swapped, DW += Σ_t onehot(x_t) g_tᵀ with g_t the gradient at the lookup's output, so it enters as
one more call of the head with δ_t = onehot(x_t) and a_t = g_t (and 0 for the bias column); the
row is then the parameter's whole gradient, as for a module called twice.
"""

from __future__ import annotations

import fnmatch
import hashlib
import weakref
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import ProjectionConfig
from .errors import UserError
from .normalizer import ModuleScale
from .projection import dense_blocks, factored_matrices
from .store import MemoryStore
from .task import Batch, Task, at_least_float32

DENSE_CACHE_BYTES = 1 << 30


@dataclass
class TrackedModule:
    """A linear layer whose gradient is collected: Linear, HF `Conv1D` (weight stored transposed)
    or Conv2d (`unfold`: its kernel size, dilation, padding and stride)."""

    name: str
    module: torch.nn.Module
    d_in: int
    d_out: int
    has_bias: bool
    transposed: bool
    unfold: dict | None = None
    weight_name: str = ""  # the model's name for the weight parameter (a shared weight's first name)
    bias_name: str | None = None
    embedding: torch.nn.Embedding | None = None  # the token embedding sharing this head's weight
    lookup: bool = False  # this call is that embedding's lookup (see the module docstring)

    @property
    def d_in_aug(self) -> int:
        return self.d_in + int(self.has_bias)

    def augment(self, a: torch.Tensor) -> torch.Tensor:
        """Inputs [..., d_in] with the bias's input appended when the module has a bias: [..., d_in_aug]
        (1, or 0 for a lookup, which does not use the bias)."""
        return torch.cat([a, a.new_full((*a.shape[:-1], 1), float(not self.lookup))], -1) if self.has_bias else a

    def inputs(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """A call's a as positions × features, [B, T, d_in] (a convolution's patches; a lookup's
        output gradient), from the call's input x and the gradient at its output."""
        if self.lookup:
            return grad.reshape(grad.shape[0], -1, self.d_in)
        if self.unfold is not None:
            x = F.unfold(x, **self.unfold).transpose(1, 2)
        return x.reshape(x.shape[0], -1, self.d_in)

    def outputs(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """A call's δ as positions × features, [B, T, d_out] (a lookup's one-hot tokens)."""
        if self.lookup:
            hot = F.one_hot(x.reshape(x.shape[0], -1), self.d_out).to(grad.dtype)
            pad = self.embedding.padding_idx
            return hot if pad is None else hot * (x.reshape(x.shape[0], -1, 1) != pad)  # the padding row gets no gradient
        if self.unfold is not None:
            grad = grad.flatten(2).transpose(1, 2)
        return grad.reshape(grad.shape[0], -1, self.d_out)

    def weight_matrix(self, w: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like the weight, as the [d_out, d_in] matrix the gradients use."""
        return w.T if self.transposed else w.reshape(self.d_out, self.d_in)

    def describe(self) -> dict:
        tied = {"tied_embedding": True} if self.embedding is not None else {}
        return {"name": self.name, "d_in": self.d_in, "d_out": self.d_out, "bias": self.has_bias, **tied}


def _conv_padding(module: torch.nn.Conv2d) -> tuple[int, int] | None:
    """Symmetric padding equal to the module's, or None when `unfold` cannot express it."""
    if isinstance(module.padding, tuple):
        return module.padding
    if module.padding == "valid":
        return (0, 0)
    total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]  # "same"
    return tuple(t // 2 for t in total) if all(t % 2 == 0 for t in total) else None


def _as_linear(name: str, module: torch.nn.Module) -> TrackedModule | None:
    if isinstance(module, torch.nn.Linear):
        return TrackedModule(name, module, module.in_features, module.out_features, module.bias is not None, False)
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers.pytorch_utils.Conv1D
        d_in, d_out = module.weight.shape
        return TrackedModule(name, module, d_in, d_out, module.bias is not None, True)
    if isinstance(module, torch.nn.Conv2d):
        padding = _conv_padding(module)
        if module.groups != 1 or module.padding_mode != "zeros" or padding is None:
            return None  # grouped, circular/reflect-padded or asymmetric "same": not a patch-wise matmul
        unfold = {"kernel_size": module.kernel_size, "dilation": module.dilation, "padding": padding, "stride": module.stride}
        d_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        return TrackedModule(name, module, d_in, module.out_channels, module.bias is not None, False, unfold)
    return None


MAX_DEFAULT_SIDE = 16384  # a 50k-vocabulary output head's Kronecker factor alone would take 20 GB


def _lookup_embedding(tm: TrackedModule, sharers: list[torch.nn.Module]) -> torch.nn.Embedding | None:
    """The plain token embedding that alone shares `tm`'s weight as [V, d], or None."""
    if len(sharers) != 1 or tm.transposed or tm.unfold is not None:
        return None
    (emb,) = sharers
    plain = type(emb).forward is torch.nn.Embedding.forward and emb.max_norm is None and not emb.scale_grad_by_freq
    return emb if isinstance(emb, torch.nn.Embedding) and plain and emb.weight.shape == (tm.d_out, tm.d_in) else None


def tracked_modules(model: torch.nn.Module, patterns: list[str] | None = None) -> dict[str, TrackedModule]:
    """The linear modules to track, in registration order.

    Default: every Linear/Conv1D/Conv2d of the model, the output head included, except
    - a module with a side over MAX_DEFAULT_SIDE (e.g. a large vocabulary's head);
    - a module whose weight is shared with another module, other than a head tied to a plain
      token embedding (GPT-2's), which is tracked with the lookup as a second call so that its
      row is the shared parameter's whole gradient. Other ties would give only one use's share.
    Name such modules in `patterns` to track them anyway. Grouped convolutions are never tracked.
    `patterns` are fnmatch globs on module names (e.g. `"*.mlp.*"`, `"transformer.h.1.*"`) and
    select from all linear modules.
    """
    sharers: dict[int, list[torch.nn.Module]] = {}
    for m in model.modules():
        if isinstance(getattr(m, "weight", None), torch.nn.Parameter):
            sharers.setdefault(id(m.weight), []).append(m)
    param_name = {id(p): n for n, p in model.named_parameters()}
    linear = {}
    for n, m in model.named_modules():
        if (tm := _as_linear(n, m)) is not None:
            tm.weight_name, tm.bias_name = param_name[id(m.weight)], param_name[id(m.bias)] if tm.has_bias else None
            others = [o for o in sharers[id(m.weight)] if o is not m]
            tm.embedding = _lookup_embedding(tm, others)
            linear[n] = (tm, not others or tm.embedding is not None)
    if patterns:
        chosen = {n: tm for n, (tm, _) in linear.items() if any(fnmatch.fnmatchcase(n, p) for p in patterns)}
        if not chosen:
            raise UserError(f"no linear module matches {patterns}; linear modules are: {', '.join(list(linear)[:20])}")
        return chosen
    chosen = {n: tm for n, (tm, alone) in linear.items() if alone and max(tm.d_out, tm.d_in_aug) <= MAX_DEFAULT_SIDE}
    if not chosen:
        raise UserError(
            "the model has no Linear, Conv1D or Conv2d module to track" + (" of a side ≤ 16384; name modules with --modules" if linear else "")
        )
    return chosen


_FINGERPRINTS: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, str]] = weakref.WeakKeyDictionary()


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every parameter's name, shape, dtype and values.

    Cached per model object until any tensor is replaced or modified in place (storage pointer
    and version counter), so repeated queries do not re-hash a large model.
    """
    state = model.state_dict()
    key = tuple((name, t.data_ptr(), t._version) for name, t in state.items())
    cached = _FINGERPRINTS.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    h = hashlib.sha256()
    for name, p in state.items():
        t = p.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    digest = h.hexdigest()[:16]
    _FINGERPRINTS[model] = (key, digest)
    return digest


class GradientCollector:
    """Computes compressed per-example gradients: `collector(batch)` → Tensor [B, dim] float32.

    Rows are the concatenation, in module order, of each module's segment (see `segments`).
    `scales` (from `normalizer.module_scales`) divides gradients by √(optimizer second moment).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        task: Task,
        projection: ProjectionConfig | None = None,
        modules: list[str] | None = None,
        scales: dict[str, ModuleScale] | None = None,
    ):
        self.model, self.task, self.projection = model, task, projection or ProjectionConfig()
        self.modules = tracked_modules(model, modules)
        self.scales = scales
        self.device = next(model.parameters()).device
        self.segments: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, tm in self.modules.items():
            width = projection.segment_dim(tm.d_out, tm.d_in_aug)
            self.segments[name] = (offset, offset + width)
            offset += width
        self.dim = offset
        self._matrices: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._dense: dict[str, list] = {}

    def describe(self) -> dict:
        return {"modules": [tm.describe() for tm in self.modules.values()], "projection": self.projection.to_dict(), "dim": self.dim}

    def _factored(self, tm: TrackedModule) -> tuple[torch.Tensor, torch.Tensor]:
        if tm.name not in self._matrices:
            p_out, p_in = factored_matrices(self.projection, tm.name, tm.d_out, tm.d_in_aug)
            if self.scales is not None:  # fold the rank-one normaliser into both sides
                p_out, p_in = p_out * self.scales[tm.name].row, p_in * self.scales[tm.name].col
            self._matrices[tm.name] = (p_out.to(self.device), p_in.to(self.device))
        return self._matrices[tm.name]

    def _dense_blocks(self, tm: TrackedModule) -> list:
        n = tm.d_out * tm.d_in_aug
        if tm.name in self._dense:
            return self._dense[tm.name]
        blocks = [(a, b, p.to(self.device)) for a, b, p in dense_blocks(self.projection, tm.name, n)]
        if self.projection.dim * n * 4 <= DENSE_CACHE_BYTES:
            self._dense[tm.name] = blocks
        return blocks

    @contextmanager
    def _recording(self):
        """Every call of a tracked module (and of a tied head's embedding) in the forward pass:
        {name: [(the call's TrackedModule, input, output)]}."""
        calls: dict[str, list[tuple[TrackedModule, torch.Tensor, torch.Tensor]]] = {n: [] for n in self.modules}
        handles = []
        for name, tm in self.modules.items():
            uses = [(tm.module, tm)] + ([(tm.embedding, replace(tm, lookup=True))] if tm.embedding is not None else [])
            for module, use in uses:
                record = lambda mod, args, out, name=name, use=use: calls[name].append((use, args[0], out))
                handles.append(module.register_forward_hook(record))
        needs_grad = [p for tm in self.modules.values() for p in tm.module.parameters() if not p.requires_grad]
        for p in needs_grad:  # outputs must be in the graph even for a frozen model
            p.requires_grad_(True)
        try:
            yield calls
        finally:
            for h in handles:
                h.remove()
            for p in needs_grad:
                p.requires_grad_(False)

    def module_grads(self, batch: Batch, loss_fn=None) -> tuple[torch.Tensor, list[tuple[TrackedModule, torch.Tensor, torch.Tensor]]]:
        """Per-example losses [B] and, for every call of a tracked module, (module, a [B, T, d_in],
        δ [B, T, d_out]) with δ the gradient of Σ_b loss_b with respect to that call's output.

        `loss_fn(model, batch) -> Tensor[B]` defaults to the task's training loss; curvature
        fitting passes a sampled-label loss, queries a measurement's objective.
        """
        loss_fn = loss_fn or self.task.loss
        batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.enable_grad(), self._recording() as calls:
            losses = loss_fn(self.model, batch)
            if losses.dim() != 1:
                raise UserError(f"the per-example loss must have shape [B], got {tuple(losses.shape)}")
            flat = [call for cs in calls.values() for call in cs]
            if not flat:
                raise UserError("no tracked module ran in the forward pass")
            grads = torch.autograd.grad(losses.sum(), [out for _, _, out in flat], allow_unused=True)
        out = []
        for (use, x, o), grad in zip(flat, grads):
            grad = torch.zeros_like(o) if grad is None else grad
            out.append((use, at_least_float32(use.inputs(x.detach(), grad)), at_least_float32(use.outputs(x.detach(), grad))))
        return losses.detach(), out

    def __call__(self, batch: Batch, loss_fn=None) -> torch.Tensor:
        """Compressed per-example gradient rows [B, dim] of the task's loss (or of `loss_fn`)."""
        losses, calls = self.module_grads(batch, loss_fn)
        rows = torch.zeros(losses.shape[0], self.dim, device=self.device, dtype=at_least_float32(losses).dtype)
        for tm, a, delta in calls:
            start, stop = self.segments[tm.name]
            rows[:, start:stop] += self._segment(tm, a, delta)
        return rows

    def token_rows(self, batch: Batch, chunk: int = 64) -> torch.Tensor:
        """Rows [N, dim] of a one-example batch: one per target token, the gradient of that token's
        loss alone (with the example's preceding tokens as context), in token order.

        Equal to collecting each prefix ending at a target token as its own example, but with a
        single forward pass and a batched backward (`is_grads_batched`) over `chunk` tokens at a time.
        """
        if batch["input_ids"].shape[0] != 1:
            raise ValueError("token_rows takes a batch of one example")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with torch.enable_grad(), self._recording() as calls:
            losses = self.task.token_loss(self.model, batch)[0]  # [T-1]
            flat = [(use, x.detach(), out) for cs in calls.values() for use, x, out in cs]
            positions = torch.nonzero(batch["target_mask"][0, 1:]).squeeze(1)
            rows = torch.zeros(len(positions), self.dim, device=self.device, dtype=at_least_float32(losses).dtype)
            for lo in range(0, len(positions), chunk):
                pos = positions[lo : lo + chunk]
                cot = torch.zeros(len(pos), losses.shape[0], device=self.device)
                cot[torch.arange(len(pos)), pos] = 1.0
                grads = torch.autograd.grad(
                    losses, [out for _, _, out in flat], grad_outputs=cot, is_grads_batched=True, retain_graph=True, allow_unused=True
                )
                for (use, x, _), grad in zip(flat, grads):
                    if grad is not None:
                        start, stop = self.segments[use.name]
                        n = len(pos)
                        grad = grad.reshape(n, *grad.shape[2:])
                        x = x.expand(n, *x.shape[1:])
                        rows[lo : lo + n, start:stop] += self._segment(use, use.inputs(x, grad), use.outputs(x, grad))
        return rows

    def _segment(self, tm: TrackedModule, a: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """One call's contribution to module `tm`'s segment, [B, segment_dim], from a [B, T, d_in] and δ [B, T, d_out]."""
        B = a.shape[0]
        a, delta = at_least_float32(a), at_least_float32(delta)
        if self.projection.kind == "factored":
            p_out, p_in = (p.to(a.dtype) for p in self._factored(tm))
            pa = a @ p_in[:, : tm.d_in].T
            if tm.has_bias and not tm.lookup:  # P_in [a; 1] without materialising [a; 1]
                pa = pa + p_in[:, tm.d_in]
            return torch.einsum("bto,bti->boi", delta @ p_out.T, pa).reshape(B, -1)
        grad = torch.einsum("bto,bti->boi", delta, tm.augment(a))
        if self.scales is not None:
            grad = grad * self.scales[tm.name].full.to(grad)
        flat = grad.reshape(B, -1)
        if self.projection.kind == "none":
            return flat
        out = flat.new_zeros(B, self.projection.dim)
        for start, stop, block in self._dense_blocks(tm):
            out += flat[:, start:stop] @ block.to(flat.dtype).T
        return out


def record_rows(
    collector: GradientCollector, task: Task, records, start: int, stop: int, batch_size: int, problems: Counter | None = None
) -> Iterator[tuple[torch.Tensor, np.ndarray, int]]:
    """Rows of records [start, stop), one per attribution unit, in order: (rows [b, dim], ids [b, 2]
    = (record, unit), done) with every record before `done` complete. Encoding problems are
    counted into `problems` (`task.check`), with the number of examples under "examples"."""
    pending: list[tuple[int, int, object]] = []
    for rec in range(start, stop):
        examples = task.encode(records[rec])
        if problems is not None:
            problems.update(task.check(examples))
            problems["examples"] += len(examples)
        if task.unit == "token":  # one forward per record, all its token rows at once
            rows = collector.token_rows(task.collate(examples))
            yield rows, np.array([(rec, u) for u in range(len(rows))], dtype=np.int64).reshape(-1, 2), rec + 1
            continue
        pending += [(rec, u, ex) for u, ex in enumerate(examples)]
        while len(pending) >= batch_size:
            batch, pending = pending[:batch_size], pending[batch_size:]
            done = rec if pending and pending[0][0] == rec else rec + 1
            yield collector(task.collate([ex for _, _, ex in batch])), np.array([(r, u) for r, u, _ in batch], dtype=np.int64), done
    if pending:
        yield collector(task.collate([ex for _, _, ex in pending])), np.array([(r, u) for r, u, _ in pending], dtype=np.int64), stop


def memory_store(collector: GradientCollector, task: Task, records, batch_size: int, progress: bool = False) -> MemoryStore:
    """Every record's rows held in memory (methods without an index)."""
    rows, ids = [], []
    bar = tqdm(total=len(records), desc="training gradients", unit="doc", disable=not progress)
    done = 0
    for r, i, d in record_rows(collector, task, records, 0, len(records), batch_size):
        rows.append(r.detach())
        ids.append(i)
        bar.update(d - done)
        done = d
    bar.close()
    segments = [(name, a, b) for name, (a, b) in collector.segments.items()]
    return MemoryStore(torch.cat(rows), np.concatenate(ids), segments)
