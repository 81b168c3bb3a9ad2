"""KFAC and EK-FAC curvature of tracked linear modules (arXiv 1806.03884, 2308.03296).

For a linear module with per-token inputs a_t (bias 1 appended, d_in_aug) and output gradients
δ_t (d_out), the Gauss–Newton / Fisher block is approximated as A ⊗ S with

    A = E_tokens[a aᵀ]              [d_in_aug, d_in_aug]
    S = E_examples[Σ_t δ_t δ_tᵀ]     [d_out, d_out]

where δ comes from the loss under labels sampled from the model (true Fisher, default) or the data
labels (empirical Fisher). With eigenbases Q_A, Q_S, KFAC's eigenvalues are λ_S λ_Aᵀ; EK-FAC
replaces them by the exact diagonal of the Fisher in that basis,
Λ*_ij = E_n[(Q_Sᵀ DW_n Q_A)²_ij], from a second pass over the same examples and sampled labels.
A spectral function of the block is applied to a gradient V [d_out, d_in_aug] as
Q_S [fn(Λ) ⊙ (Q_Sᵀ V Q_A)] Q_Aᵀ: the damped inverse for influence functions, exp(−ηKΛ) for SOURCE.
Convolutions of at most `CurvatureConfig.dense_conv_blocks` parameters keep the whole block in
that basis, B = E_n[vec(Q_Sᵀ DW_n Q_A) vec(…)ᵀ] = U diag(σ) Uᵀ [P, P], whose diagonal is Λ*, and
apply fn(σ) in U's basis instead: the exact Fisher block. A convolution's factors treat its
positions as independent examples, and its Kronecker basis fits the block far worse than a
linear layer's does (benchmarks/ekfac_blocks.py).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .collect import GradientCollector
from .config import CurvatureConfig, ProjectionConfig
from .errors import UserError
from .task import ModuleTask, Task, collated_batches, is_classifier, whole_examples


@dataclass
class ModuleCurvature:
    """Eigenbases and eigenvalues of one module's Kronecker-factored block (float64)."""

    q_a: torch.Tensor  # [d_in_aug, d_in_aug]
    lam_a: torch.Tensor  # [d_in_aug]
    q_s: torch.Tensor  # [d_out, d_out]
    lam_s: torch.Tensor  # [d_out]
    corrected: torch.Tensor | None = None  # EK-FAC Λ* [d_out, d_in_aug]
    block: tuple[torch.Tensor, torch.Tensor] | None = None  # the whole block in the Kronecker basis: σ [P], U [P, P]

    def eigenvalues(self, ekfac: bool = True) -> torch.Tensor:
        """Eigenvalues of the block: in the Kronecker eigenbasis [d_out, d_in_aug], or, for a dense
        block, its own [P] (the same mean: both sum to the block's trace)."""
        if ekfac and self.block is not None:
            return self.block[0]
        if ekfac:
            if self.corrected is None:
                raise UserError("these factors have no eigenvalue correction; fit with ekfac=True or use kfac")
            return self.corrected
        return torch.outer(self.lam_s, self.lam_a).clamp_min(0)

    def rotate(self, v: torch.Tensor) -> torch.Tensor:
        """Q_Sᵀ V Q_A for V [..., d_out, d_in_aug]."""
        return self.q_s.T.to(v) @ v @ self.q_a.to(v)

    def unrotate(self, v: torch.Tensor) -> torch.Tensor:
        return self.q_s.to(v) @ v @ self.q_a.T.to(v)

    def apply(self, v: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], ekfac: bool = True) -> torch.Tensor:
        """Q_S [fn(Λ) ⊙ (Q_Sᵀ V Q_A)] Q_Aᵀ for V [..., d_out, d_in_aug] (a dense block: U fn(σ) Uᵀ in place of fn(Λ) ⊙)."""
        r = self.rotate(v)
        if ekfac and self.block is not None:
            values, vectors = (t.to(v) for t in self.block)
            flat = r.reshape(*r.shape[:-2], -1)
            return self.unrotate((((flat @ vectors) * fn(values)) @ vectors.T).reshape(r.shape))
        return self.unrotate(r * fn(self.eigenvalues(ekfac)).to(v))


@dataclass
class Curvature:
    """Per-module curvature blocks plus how they were fitted."""

    modules: dict[str, ModuleCurvature]
    config: CurvatureConfig
    examples: int = 0
    meta: dict = field(default_factory=dict)
    means: dict = field(default_factory=dict, repr=False)  # mean_eigenvalue's cache

    def damping_for(self, name: str, damping: float, mode: str = "relative", ekfac: bool = True) -> float:
        """λ for module `name`: `damping` itself (absolute), times the module's mean eigenvalue
        (relative), or times the mean eigenvalue over every module (model: one λ for the whole
        curvature, as a dense matrix would have)."""
        if mode == "absolute":
            return damping
        if mode == "model":
            return damping * self.mean_eigenvalue(ekfac)
        return damping * float(self.modules[name].eigenvalues(ekfac).mean())

    def mean_eigenvalue(self, ekfac: bool = True) -> float:
        """The mean eigenvalue over every module (computed once per `ekfac`: CG asks per module and step)."""
        if ekfac not in self.means:
            eigs = [m.eigenvalues(ekfac) for m in self.modules.values()]
            self.means[ekfac] = float(sum(e.sum() for e in eigs)) / sum(e.numel() for e in eigs)
        return self.means[ekfac]

    def inverse_hvp(self, grads: dict[str, torch.Tensor], damping: float, mode: str = "relative", ekfac: bool = True) -> dict[str, torch.Tensor]:
        """(G + λI)⁻¹ g per module for gradients {name: [..., d_out, d_in_aug]}, in float64."""
        out = {}
        for name, g in grads.items():
            lam = self.damping_for(name, damping, mode, ekfac)
            out[name] = self.modules[name].apply(g.double(), lambda e: 1.0 / (e + lam), ekfac)
        return out

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, m in self.modules.items():
            for key in ("q_a", "lam_a", "q_s", "lam_s", "corrected"):
                if getattr(m, key) is not None:
                    tensors[f"{name}/{key}"] = getattr(m, key).contiguous()
            if m.block is not None:
                tensors[f"{name}/block_values"], tensors[f"{name}/block_vectors"] = (t.contiguous() for t in m.block)
        meta = {"config": self.config.to_dict(), "examples": self.examples, "meta": self.meta, "modules": list(self.modules)}
        save_file(tensors, str(path), metadata={"headwater": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path) -> Curvature:
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise UserError(f"curvature file {path} does not exist")
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads(fh.metadata()["headwater"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        modules = {}
        for name in meta["modules"]:
            block = (tensors[f"{name}/block_values"], tensors[f"{name}/block_vectors"]) if f"{name}/block_values" in tensors else None
            modules[name] = ModuleCurvature(
                *(tensors[f"{name}/{k}"] for k in ("q_a", "lam_a", "q_s", "lam_s")), tensors.get(f"{name}/corrected"), block
            )
        return cls(modules, CurvatureConfig.from_dict(meta["config"]), meta["examples"], meta["meta"])


def curvature_batches(task: Task, records, config: CurvatureConfig) -> list:
    """The batches curvature is fitted on: one example per record, all its targets (the training
    loss), a seeded sample of them when `max_examples`."""
    examples = whole_examples(task, records)
    if config.max_examples is not None:
        g = torch.Generator().manual_seed(config.seed)
        keep = torch.randperm(len(examples), generator=g)[: config.max_examples].sort().values.tolist()
        examples = [examples[i] for i in keep]
    if not examples:
        raise UserError("no examples to fit curvature on")
    return list(collated_batches(task, examples, config.batch_size))


def fisher_loss(task: Task, config: CurvatureConfig, batch_index: int):
    """The per-example loss whose gradients define the Fisher: the data's labels (empirical) or
    labels sampled from the model (true), seeded per batch (and rank) so both passes see the
    same samples."""
    if config.fisher == "empirical":
        return task.loss
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + rank * 1_000_000_007 + batch_index)  # own stream per rank
    return lambda model, batch: task.loss(model, batch, sample=gen)


DENSE_CONV_BLOCKS = 4096  # CurvatureConfig.dense_conv_blocks's default: a block of at most 128 MiB
MAX_CLASSES = 64  # fisher="exact" takes one backward pass per class


def class_count(task: ModuleTask, model: torch.nn.Module, batch: dict) -> int:
    """How many classes the classifier's outputs on `batch` have (one forward pass)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        return task.outputs(model, {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}).shape[-1]


def fisher_draws(task: Task, model: torch.nn.Module, config: CurvatureConfig, batch: dict, index: int):
    """The (batch, loss function, weighted) terms whose per-example gradients' outer products sum
    to the batch's Fisher. One term with `fisher_loss`'s labels, except for fisher="exact" (a ModuleTask
    classifier): one term per class c, every target set to c, each example weighted by the model's
    p_c = e^(−loss). One sampled label per example is a noisy estimate of the Fisher of a confident
    classifier, whose rare classes carry most of it (benchmarks/cg.py)."""
    if config.fisher != "exact":
        yield batch, fisher_loss(task, config, index), False
        return
    if not is_classifier(task):
        raise UserError("fisher='exact' (the expectation over every class) needs a ModuleTask classifier (loss_fn='cross_entropy'): use 'true'")
    classes = class_count(task, model, batch)
    if classes > MAX_CLASSES:
        raise UserError(f"fisher='exact' takes a backward pass per class and the model has {classes} (at most {MAX_CLASSES}); use fisher='true'")
    target = batch[task.target_key]
    for c in range(classes):
        yield {**batch, task.target_key: torch.full_like(target, c)}, task.loss, True


def block_fisher(task: Task, model: torch.nn.Module, config: CurvatureConfig, batch: dict) -> str:
    """The Fisher of the whole convolution blocks: `config.dense_fisher`, or by default, in place of
    the sampled true Fisher, its exact expectation over the classes for a ModuleTask classifier of
    at most MAX_CLASSES classes (a block has P² entries, and one sampled label per example
    estimates it with rank at most the number of examples), else `config.fisher`."""
    if config.dense_fisher is not None:
        return config.dense_fisher
    if config.fisher != "true" or not is_classifier(task):
        return config.fisher
    return "exact" if class_count(task, model, batch) <= MAX_CLASSES else config.fisher


def rotated(curv: dict, calls, device) -> dict[str, torch.Tensor]:
    """Per-example gradients in each module's Kronecker eigenbasis, {module: [B, d_out, d_in_aug]}:
    Q_Sᵀ DW_n Q_A = Σ_t (Q_Sᵀ δ_t)(Q_Aᵀ a_t)ᵀ; calls of one module add up."""
    out: dict[str, torch.Tensor] = {}
    for tm, a, delta in calls:
        m = curv[tm.name]
        rot = torch.einsum("bto,bti->boi", delta.double() @ m.q_s.to(device), tm.augment(a).double() @ m.q_a.to(device))
        out[tm.name] = out.get(tm.name, 0) + rot
    return out


def draw_weights(losses: torch.Tensor, weighted: bool) -> torch.Tensor:
    """Each example's weight [B] (float64) in a `fisher_draws` term: p_c = e^(−loss_c), or 1."""
    return torch.exp(-losses.double()) if weighted else torch.ones_like(losses, dtype=torch.float64)


def _token_mask(batch: dict, a: torch.Tensor) -> torch.Tensor:
    """[B, T] which positions are real tokens (padding excluded from A)."""
    mask = batch.get("attention_mask")
    if mask is not None and mask.shape == a.shape[:2]:
        return mask.to(a.device).bool()
    return torch.ones(a.shape[:2], dtype=torch.bool, device=a.device)


def _all_reduce(tensors: list[torch.Tensor]) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t)


def fit_curvature(
    model: torch.nn.Module | list[torch.nn.Module],
    task: Task,
    records,
    modules: list[str] | None = None,
    config: CurvatureConfig | None = None,
    ekfac: bool = True,
    progress: bool = True,
) -> Curvature:
    """Fit KFAC factors (and, with `ekfac`, the eigenvalue correction) on `records`.

    A list of models (checkpoints of one run, as in SOURCE's segments) pools their statistics
    into one set of factors. Each rank passes its own share of records; sums are all-reduced
    when torch.distributed is initialised, so every rank ends with the same factors.
    """
    config = config or CurvatureConfig()
    if config.fisher is None:  # saved with the curvature: the Fisher it was fitted with
        config = dataclasses.replace(config, fisher="true")
    if config.dense_conv_blocks is None:
        config = dataclasses.replace(config, dense_conv_blocks=DENSE_CONV_BLOCKS)
    collectors = [GradientCollector(m, task, ProjectionConfig("none"), modules) for m in (model if isinstance(model, (list, tuple)) else [model])]
    collector = collectors[0]
    batches = curvature_batches(task, records, config)
    passes = [(col, i, batch) for col in collectors for i, batch in enumerate(batches)]
    dev = collector.device
    A = {n: torch.zeros(tm.d_in_aug, tm.d_in_aug, dtype=torch.float64, device=dev) for n, tm in collector.modules.items()}
    S = {n: torch.zeros(tm.d_out, tm.d_out, dtype=torch.float64, device=dev) for n, tm in collector.modules.items()}
    tokens = torch.zeros(len(A), dtype=torch.float64, device=dev)  # per module: a call's tokens count as more tokens
    examples = torch.zeros(1, dtype=torch.float64, device=dev)
    slot = {n: i for i, n in enumerate(A)}
    for col, i, batch in tqdm(passes, desc="curvature: factors", disable=not progress):
        for j, (labelled, loss, weighted) in enumerate(fisher_draws(task, col.model, config, batch, i)):
            losses, calls = col.module_grads(labelled, loss)
            root = draw_weights(losses, weighted).sqrt().to(dev)[:, None, None]
            for tm, a, delta in calls:
                if j == 0:  # the activations do not depend on the labels
                    mask = _token_mask(batch, a)
                    a_aug = tm.augment(a)[mask].double()
                    A[tm.name] += a_aug.T @ a_aug
                    tokens[slot[tm.name]] += mask.sum()
                d = (delta.double() * root).reshape(-1, tm.d_out)
                S[tm.name] += d.T @ d
            examples += losses.shape[0] if j == 0 else 0
    _all_reduce([*A.values(), *S.values(), tokens, examples])
    n_examples = float(examples.item())
    curv = {}
    for name in A:
        lam_a, q_a = torch.linalg.eigh(A[name] / tokens[slot[name]])
        lam_s, q_s = torch.linalg.eigh(S[name] / n_examples)
        curv[name] = ModuleCurvature(q_a.cpu(), lam_a.clamp_min(0).cpu(), q_s.cpu(), lam_s.clamp_min(0).cpu())
    if ekfac:
        corr = {n: torch.zeros(m.q_s.shape[0], m.q_a.shape[0], dtype=torch.float64, device=dev) for n, m in curv.items()}
        convs = {n for n, tm in collector.modules.items() if isinstance(tm.module, torch.nn.Conv2d)}
        dense = {
            n: torch.zeros(c.numel(), c.numel(), dtype=torch.float64, device=dev)
            for n, c in corr.items()
            if n in convs and c.numel() <= config.dense_conv_blocks
        }
        block_config = dataclasses.replace(config, fisher=block_fisher(task, collector.model, config, batches[0])) if dense else config
        for col, i, batch in tqdm(passes, desc="curvature: eigenvalue correction", disable=not progress):
            for labelled, loss, weighted in fisher_draws(task, col.model, config, batch, i):
                losses, calls = col.module_grads(labelled, loss)
                w = draw_weights(losses, weighted).to(dev)
                for name, rot in rotated(curv, calls, dev).items():
                    corr[name] += torch.einsum("b,boi->oi", w, rot**2)
                    if name in dense and block_config.fisher == config.fisher:
                        flat = rot.reshape(rot.shape[0], -1)
                        dense[name] += (flat * w[:, None]).T @ flat
            if block_config.fisher == config.fisher:
                continue
            for labelled, loss, weighted in fisher_draws(task, col.model, block_config, batch, i):  # the blocks' own Fisher
                losses, calls = col.module_grads(labelled, loss)
                w = draw_weights(losses, weighted).to(dev)
                for name, rot in rotated(curv, [c for c in calls if c[0].name in dense], dev).items():
                    flat = rot.reshape(rot.shape[0], -1)
                    dense[name] += (flat * w[:, None]).T @ flat
        _all_reduce([*corr.values(), *dense.values()])
        for name, c in corr.items():
            curv[name].corrected = (c / n_examples).cpu()
        for name, b in dense.items():
            values, vectors = torch.linalg.eigh(b / n_examples)
            curv[name].block = (values.clamp_min(0).cpu(), vectors.cpu())
    return Curvature(curv, config, int(n_examples), {"tokens": {n: int(tokens[slot[n]].item()) for n in A}})
