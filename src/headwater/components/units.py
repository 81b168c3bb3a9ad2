"""Components: the units a behaviour is attributed to inside a model.

A component is a slice of the last dimension of the activation at a site: an attention head (its
`head_dim` block of the heads' outputs, before the output projection, so that grouped-query
models are split by their query heads), a whole MLP (its output), one MLP neuron (one hidden
unit, the input of the MLP's output projection), or any module's output (`module_components`,
for models that are not transformers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..architecture import Site, architecture, module_of
from ..errors import UserError

KINDS = ("head", "mlp", "neuron")


@dataclass(frozen=True)
class Component:
    """`span` = (start, stop) of the site's last dimension, or None for all of it."""

    name: str
    kind: str
    site: Site
    span: tuple[int, int] | None = None
    layer: int | None = None
    index: int | None = None


def _width(model: torch.nn.Module, site: Site) -> int:
    """The last dimension of the activation at `site` (from the module's weights)."""
    module = module_of(model, site.module)
    weight = getattr(module, "weight", None)
    if weight is None:
        raise UserError(f"cannot tell the width of {site.module} ({site.read}) from its weights")
    transposed = type(module).__name__ == "Conv1D"  # GPT-2's projections store [in, out]
    d_out, d_in = (weight.shape[1], weight.shape[0]) if transposed else weight.shape[:2]
    return d_in if site.read == "input" else d_out


def transformer_components(model: torch.nn.Module, kinds: tuple[str, ...] = ("head", "mlp")) -> list[Component]:
    """Every head, MLP and/or neuron of a transformer, layer by layer."""
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise UserError(f"unknown component kind {bad[0]!r}; choose from {', '.join(KINDS)}")
    arch = architecture(model)
    out = []
    for layer in range(arch.n_layers):
        if "head" in kinds:
            site = arch.heads(layer)
            width = _width(model, site)
            if width % arch.n_heads:
                raise UserError(f"the heads' outputs at {site.module} ({width}) do not split into {arch.n_heads} heads")
            d = width // arch.n_heads
            out += [Component(f"L{layer}H{h}", "head", site, (h * d, (h + 1) * d), layer, h) for h in range(arch.n_heads)]
        if "mlp" in kinds:
            out.append(Component(f"L{layer} MLP", "mlp", arch.mlp_output(layer), None, layer))
        if "neuron" in kinds:
            site = arch.neurons(layer)
            out += [Component(f"L{layer}N{i}", "neuron", site, (i, i + 1), layer, i) for i in range(_width(model, site))]
    return out


def module_components(model: torch.nn.Module, names: list[str], neurons: bool = False) -> list[Component]:
    """Each named module's output as a component (or, with `neurons`, each of its output units)."""
    out = []
    for name in names:
        site = Site(name)
        module_of(model, name)
        if neurons:
            out += [Component(f"{name}[{i}]", "neuron", site, (i, i + 1), None, i) for i in range(_width(model, site))]
        else:
            out.append(Component(name, "module", site))
    return out
