"""Attribution patching, its integrated-gradients variant, exact activation patching, faithfulness.

Sign (pinned by tests/test_components.py): every score estimates the *denoising* effect
M(corrupt run, component ← its clean activation) − M(corrupt run). With the logit difference
(clean answer − corrupt answer), a positive score means the component's clean activation alone
restores part of the clean behaviour.

- attribution patching: (a_clean − a_corrupt)ᵀ ∂M/∂a, the gradient taken on the corrupt run; one
  forward and one backward pass for every component at once. Exact when M is linear in a.
- integrated gradients: the same difference times the gradient averaged along inputs
  interpolated from corrupt to clean (token embeddings for language models; midpoints of `steps`
  equal segments), which follows the path instead of the tangent at the corrupt end.
- exact activation patching: one forward pass per component, the reference the two above
  approximate; `faithfulness` keeps a set of components at their clean activations and patches
  every other component to its corrupt one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..architecture import Site, capture
from ..errors import UserError
from ..scores import Scores
from .units import Component

METHODS = ("gradient", "integrated")


def unique_sites(components: list[Component]) -> list[Site]:
    return list(dict.fromkeys(c.site for c in components))


def site_activations(model: torch.nn.Module, behaviour, which: str, sites: list[Site]) -> dict[Site, torch.Tensor]:
    """The activation at every site, [N, T, d] each, on the clean or corrupt inputs."""
    with torch.no_grad(), contextlib.ExitStack() as stack:
        seen = {s: stack.enter_context(capture(model, s)) for s in sites}
        behaviour.metric(model, behaviour.inputs(which))
    _check_once(seen)
    return {s: seen[s][-1].detach() for s in sites}


def _check_once(seen: dict[Site, list]) -> None:
    """Each site must run exactly once per forward pass (a component is one activation)."""
    for site, tensors in seen.items():
        if len(tensors) != 1:
            what = "never ran" if not tensors else f"ran {len(tensors)} times"
            raise UserError(f"{site.module} ({site.read}) {what} in one forward pass of the metric; a component must run exactly once")


def _requiring_grad(x: torch.Tensor) -> torch.Tensor:
    """x itself when it is in the autograd graph; else (frozen weights upstream) a leaf that is."""
    return x if x.requires_grad else x.detach().requires_grad_()


Activations = dict[Site, torch.Tensor]


def site_gradients(model: torch.nn.Module, sites: list[Site], run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, Activations, Activations]:
    """(metric [N], activation a and ∂M/∂a at every site, [N, T, d] each) of the forward pass
    `run()`; pairs do not interact, so the gradient of the summed metric holds each pair's own."""
    with torch.enable_grad(), contextlib.ExitStack() as stack:
        seen = {s: stack.enter_context(capture(model, s, replace=_requiring_grad)) for s in sites}
        metric = run()
        _check_once(seen)
        tensors = [seen[s][-1] for s in sites]
        grads = torch.autograd.grad(metric.sum(), tensors, allow_unused=True)
    acts = {s: t.detach() for s, t in zip(sites, tensors)}
    return metric.detach(), acts, {s: (g if g is not None else torch.zeros_like(t)).detach() for s, t, g in zip(sites, tensors, grads)}


def _contribution(component: Component, delta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Σ over positions and the component's slice of delta · grad, per pair [N]."""
    if component.span is not None:
        a, b = component.span
        delta, grad = delta[..., a:b], grad[..., a:b]
    return (delta * grad).reshape(len(delta), -1).sum(1)


def attribution_patching(
    model: torch.nn.Module, behaviour, components: list[Component], method: str = "gradient", steps: int = 8, progress: bool = False
) -> Scores:
    """Estimated denoising effect of every component on every pair: Scores [components, pairs]."""
    if method not in METHODS:
        raise UserError(f"unknown attribution patching method {method!r}; choose {' or '.join(METHODS)}")
    if not components:
        raise UserError("no components to attribute")
    sites = unique_sites(components)
    clean = site_activations(model, behaviour, "clean", sites)
    if method == "gradient":
        corrupt_x = behaviour.inputs("corrupt")
        _, corrupt, grads = site_gradients(model, sites, lambda: behaviour.metric(model, corrupt_x))
    else:
        if steps < 1:
            raise UserError(f"integrated gradients need at least one step, got {steps}")
        corrupt = site_activations(model, behaviour, "corrupt", sites)
        with torch.no_grad():
            e0, e1 = behaviour.embed(model, behaviour.inputs("corrupt")), behaviour.embed(model, behaviour.inputs("clean"))
        grads = {s: torch.zeros_like(corrupt[s]) for s in sites}
        for k in tqdm(range(steps), desc="integrated gradients", disable=not progress):
            alpha = (k + 0.5) / steps
            e = (e0 + alpha * (e1 - e0)).detach()
            _, _, g = site_gradients(model, sites, lambda: behaviour.metric_embedded(model, e))
            for s in sites:
                grads[s] += g[s] / steps
    values = torch.stack([_contribution(c, clean[c.site] - corrupt[c.site], grads[c.site]) for c in components])
    name = "attribution-patching" if method == "gradient" else "integrated-gradients"
    config = {"method": method, "steps": steps if method == "integrated" else None}
    return _scores(values, components, behaviour, name, config)


def _scores(values: torch.Tensor, components: list[Component], behaviour, method: str, config: dict) -> Scores:
    return Scores(
        values.double().cpu().numpy(), [c.name for c in components], behaviour.ids, method=method, measurement=behaviour.describe(), config=config
    )


def _patcher(source: torch.Tensor, spans: list[tuple[int, int] | None]) -> Callable[[torch.Tensor], torch.Tensor]:
    """x with the given slices of its last dimension replaced by `source`'s."""
    keep = torch.zeros(source.shape[-1], dtype=torch.bool, device=source.device)
    for span in spans:
        if span is None:
            keep[:] = True
        else:
            keep[span[0] : span[1]] = True
    return lambda x: torch.where(keep.to(x.device), source.to(x), x)


def patched_metric(model: torch.nn.Module, behaviour, which: str, patches: dict[Site, tuple[torch.Tensor, list]]) -> torch.Tensor:
    """The metric [N] on the `which` inputs with each site's listed slices taken from its source."""
    with torch.no_grad(), contextlib.ExitStack() as stack:
        for site, (source, spans) in patches.items():
            stack.enter_context(capture(model, site, replace=_patcher(source, spans)))
        return behaviour.metric(model, behaviour.inputs(which))


def exact_patching(model: torch.nn.Module, behaviour, components: list[Component], progress: bool = False) -> Scores:
    """The denoising effect of each component measured by patching it: Scores [components, pairs]."""
    sites = unique_sites(components)
    clean = site_activations(model, behaviour, "clean", sites)
    with torch.no_grad():
        base = behaviour.metric(model, behaviour.inputs("corrupt"))
    values = [
        patched_metric(model, behaviour, "corrupt", {c.site: (clean[c.site], [c.span])}) - base
        for c in tqdm(components, desc="activation patching", disable=not progress)
    ]
    return _scores(torch.stack(values), components, behaviour, "activation-patching", {})


def faithfulness(model: torch.nn.Module, behaviour, components: list[Component], keep: list[Component]) -> float:
    """(M(circuit) − M(corrupt)) / (M(clean) − M(corrupt)), means over pairs: the clean run with
    every component of `components` outside `keep` patched to its corrupt activation."""
    return float(faithfulness_curve(model, behaviour, components, [c.name for c in keep], [len(keep)])["faithfulness"].iloc[0])


def faithfulness_curve(model: torch.nn.Module, behaviour, components: list[Component], order: list[str], sizes: list[int]) -> pd.DataFrame:
    """Faithfulness of the first n components of `order` (names, best first) for each n in `sizes`."""
    by_name = {c.name: c for c in components}
    unknown = [n for n in order if n not in by_name]
    if unknown:
        raise UserError(f"unknown component {unknown[0]!r}")
    sites = unique_sites(components)
    corrupt = site_activations(model, behaviour, "corrupt", sites)
    with torch.no_grad():
        m_clean = float(behaviour.metric(model, behaviour.inputs("clean")).mean())
        m_corrupt = float(behaviour.metric(model, behaviour.inputs("corrupt")).mean())
    if abs(m_clean - m_corrupt) < 1e-12:
        raise UserError("the metric is the same on clean and corrupt inputs: nothing to be faithful to")
    rows = []
    for n in sizes:
        kept = set(order[:n])
        patches: dict[Site, tuple[torch.Tensor, list]] = {}
        for c in components:
            if c.name not in kept:
                patches.setdefault(c.site, (corrupt[c.site], []))[1].append(c.span)
        m = float(patched_metric(model, behaviour, "clean", patches).mean())
        rows.append({"components": n, "faithfulness": (m - m_corrupt) / (m_clean - m_corrupt)})
    return pd.DataFrame(rows)


def component_table(components: list[Component], scores: Scores, exact: Scores | None = None) -> pd.DataFrame:
    """One row per component: name, kind, layer, index, score (mean over pairs), rank (by
    |score|), and the exact patching effect where it was measured."""
    mean = scores.values.mean(1)
    frame = pd.DataFrame(
        {
            "component": [c.name for c in components],
            "kind": [c.kind for c in components],
            "layer": [c.layer for c in components],
            "index": [c.index for c in components],
            "score": mean,
        }
    )
    frame["rank"] = (-np.abs(mean)).argsort().argsort() + 1
    if exact is not None:
        effect = dict(zip(exact.train_ids, exact.values.mean(1)))
        frame["exact"] = [effect.get(c.name, np.nan) for c in components]
    return frame.sort_values("rank").reset_index(drop=True)
