"""Where things live inside a transformer: blocks, attention, MLPs, and the activations read there.

Concepts, SAE features and components all name a *site*: a module and whether its input or its
output is read. `architecture(model)` finds the blocks of Hugging Face GPT-2 style
(`transformer.h`, `attn.c_proj`, `mlp.c_proj`) and Llama style (`model.layers`,
`self_attn.o_proj`, `mlp.down_proj`; grouped-query attention has as many query heads as the
output projection's input splits into) models, and of others that follow either naming.
`capture(model, site)` reads a site's activation in a forward pass, and can replace it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .errors import UserError

BLOCK_LISTS = ("transformer.h", "model.layers", "gpt_neox.layers", "model.decoder.layers", "transformer.blocks", "layers", "h", "blocks")
ATTENTION = ("attn", "self_attn", "attention")
ATTENTION_OUT = ("c_proj", "o_proj", "out_proj", "dense")
MLP = ("mlp", "feed_forward")
MLP_OUT = ("c_proj", "down_proj", "fc2", "dense_4h_to_h", "w2")
ATTENTION_NORM = ("ln_1", "input_layernorm", "attention_norm", "self_attn_layer_norm")
MLP_NORM = ("ln_2", "post_attention_layernorm", "ffn_norm", "final_layer_norm")
FINAL_NORM = ("ln_f", "norm", "final_layer_norm", "final_layernorm")


@dataclass(frozen=True)
class Site:
    """An activation inside the model: the input or output of the module `module`."""

    module: str
    read: str = "output"

    def __post_init__(self):
        if self.read not in ("input", "output"):
            raise UserError(f"a site reads a module's 'input' or 'output', not {self.read!r}")


@dataclass(frozen=True)
class Architecture:
    """Module names of a decoder-only transformer: `blocks` holds `n_layers` blocks, each with an
    attention module, its output projection (whose input is the heads' outputs side by side,
    `n_heads` × `head_dim`), an MLP and the MLP's output projection (input: the neurons), and the
    (pre-)norms through which attention and MLP read the residual stream; `final_norm` precedes
    the unembedding. Names inside a block are relative to it."""

    blocks: str
    n_layers: int
    n_heads: int
    attention: str
    attention_out: str
    mlp: str
    mlp_out: str
    attention_norm: str | None = None
    mlp_norm: str | None = None
    final_norm: str | None = None

    def block(self, layer: int) -> str:
        if not -self.n_layers <= layer < self.n_layers:
            raise UserError(f"layer {layer} does not exist: the model has {self.n_layers} layers (0-{self.n_layers - 1})")
        return f"{self.blocks}.{layer % self.n_layers}"

    def residual(self, layer: int) -> Site:
        """The residual stream after block `layer` (its output)."""
        return Site(self.block(layer))

    def heads(self, layer: int) -> Site:
        """The heads' outputs before the output projection, [.., n_heads × head_dim]."""
        return Site(f"{self.block(layer)}.{self.attention_out}", "input")

    def mlp_output(self, layer: int) -> Site:
        return Site(f"{self.block(layer)}.{self.mlp}")

    def neurons(self, layer: int) -> Site:
        """The MLP's hidden activations, the input of its output projection."""
        return Site(f"{self.block(layer)}.{self.mlp_out}", "input")


def _child(modules: dict, prefix: str, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if f"{prefix}.{n}" in modules), None)


def architecture(model: torch.nn.Module) -> Architecture:
    """The transformer layout of `model`, or a UserError naming what was not found."""
    modules = dict(model.named_modules())
    blocks = next((b for b in BLOCK_LISTS if isinstance(modules.get(b), torch.nn.ModuleList)), None)
    if blocks is None:
        raise UserError(
            "cannot find the model's transformer blocks (a ModuleList named e.g. transformer.h or model.layers); name sites by module instead"
        )
    first = f"{blocks}.0"
    attn, mlp = _child(modules, first, ATTENTION), _child(modules, first, MLP)
    if attn is None or mlp is None:
        raise UserError(f"cannot find the attention and MLP modules inside {first}")
    attn_out = _child(modules, f"{first}.{attn}", ATTENTION_OUT)
    mlp_out = _child(modules, f"{first}.{mlp}", MLP_OUT)
    if attn_out is None or mlp_out is None:
        raise UserError(f"cannot find the output projections of {first}.{attn} and {first}.{mlp}")
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    if not heads:
        raise UserError("the model's config names no number of attention heads (num_attention_heads / n_head)")
    parent = blocks.rpartition(".")[0]
    final = next((f"{parent}.{n}".lstrip(".") for n in FINAL_NORM if f"{parent}.{n}".lstrip(".") in modules), None)
    return Architecture(
        blocks,
        len(modules[blocks]),
        int(heads),
        attn,
        f"{attn}.{attn_out}",
        mlp,
        f"{mlp}.{mlp_out}",
        _child(modules, first, ATTENTION_NORM),
        _child(modules, first, MLP_NORM),
        final,
    )


def layer_site(model: torch.nn.Module, layer: int | str) -> Site:
    """The site of a `--layer` argument: a block number (the residual stream after it) or a
    module name (its output)."""
    if isinstance(layer, int) or re.fullmatch(r"-?\d+", str(layer)):
        return architecture(model).residual(int(layer))
    module_of(model, str(layer))
    return Site(str(layer))


def module_of(model: torch.nn.Module, name: str) -> torch.nn.Module:
    module = dict(model.named_modules()).get(name)
    if module is None:
        raise UserError(f"the model has no module {name!r}")
    return module


class StopForward(Exception):
    """Raised by `capture(stop=True)` once the site is read: the rest of the forward is skipped."""


@contextlib.contextmanager
def capture(
    model: torch.nn.Module, site: Site, replace: Callable[[torch.Tensor], torch.Tensor] | None = None, stop: bool = False
) -> Iterator[list[torch.Tensor]]:
    """Within the block, every forward pass appends the site's activation [B, T, d] to the
    yielded list; with `replace`, the module reads (input) or passes on (output)
    `replace(activation)` instead, and the list holds the replaced tensors (the ones the rest of
    the model uses, so their gradients are the model's). With `stop`, the forward pass ends
    there by raising `StopForward` (catch it: `forward_until`)."""
    module, seen = module_of(model, site.module), []

    def swap(x: torch.Tensor) -> torch.Tensor:
        x = replace(x) if replace is not None else x
        seen.append(x)
        if stop:
            raise StopForward
        return x

    if site.read == "output":

        def hook(mod, args, out):
            if isinstance(out, (tuple, list)):
                return type(out)((swap(out[0]), *out[1:]))
            return swap(out)

        handle = module.register_forward_hook(hook)
    else:

        def hook(mod, args, kwargs):
            if args:
                return (swap(args[0]), *args[1:]), kwargs
            key = next(iter(kwargs))  # the hidden states passed by keyword
            return args, {**kwargs, key: swap(kwargs[key])}

        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def forward_until(model: torch.nn.Module, site: Site, run: Callable[[], object]) -> torch.Tensor:
    """The activation at `site` of the forward pass `run()`, skipping everything after it."""
    with capture(model, site, stop=True) as seen:
        try:
            run()
        except StopForward:
            pass
    if not seen:
        raise UserError(f"the forward pass never reached {site.module} ({site.read})")
    return seen[-1]


def target_mean(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Activations h [B, T, d] averaged over each example's target positions `mask` [B, T]
    (all positions when None), [B, d]; h [B, d] (one output per example) is returned as is."""
    if h.dim() == 2:
        return h
    if mask is None:
        return h.mean(1)
    mask = mask.to(h.device, h.dtype)[..., None]
    return (h * mask).sum(1) / mask.sum(1).clamp_min(1)
