"""SAE features as concepts, read from SAELens folders with `safetensors` (no sae-lens needed).

A folder holds `cfg.json` and `sae_weights.safetensors` (`W_enc` [d_in, d_sae], `W_dec`
[d_sae, d_in], `b_enc` [d_sae], `b_dec` [d_in]; `threshold` for JumpReLU, `b_gate` for gated
SAEs). Three `cfg.json` layouts are in use:

- before 6.0: flat keys `hook_name` and `hook_layer` (older still: `hook_point`, `hook_point_layer`);
- 6.0.0-rc.2: a `metadata` block with `hook_name` and `hook_layer`;
- from 6.0.0-rc.3: `metadata.hook_name` only, the layer being the number in `blocks.<n>.`.

A feature's *output* (ReLU, JumpReLU, top-k) has zero gradient wherever it is off, which would
silently zero every attribution score, so the concept is the feature's encoder pre-activation
((h − b_dec)·W_enc[:, i] + b_enc[i], linear in h) or its decoder direction W_dec[i].
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..architecture import Site, architecture
from ..errors import UserError
from .vector import ConceptVector

WEIGHTS, CONFIG = "sae_weights.safetensors", "cfg.json"


@dataclass
class SAE:
    """The weights and the parts of the configuration a concept needs."""

    W_enc: torch.Tensor = field(repr=False)
    W_dec: torch.Tensor = field(repr=False)
    b_enc: torch.Tensor = field(repr=False)
    b_dec: torch.Tensor = field(repr=False)
    hook_name: str
    layer: int
    architecture: str = "standard"
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    threshold: torch.Tensor | None = field(default=None, repr=False)
    layout: str = "flat"
    cfg: dict = field(default_factory=dict, repr=False)

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def pre_activation(self, h: torch.Tensor) -> torch.Tensor:
        """The features' pre-activations of activations h [..., d_in], [..., d_sae]."""
        x = h - self.b_dec.to(h) if self.apply_b_dec_to_input else h
        return x @ self.W_enc.to(h) + self.b_enc.to(h)


def _layout(cfg: dict) -> tuple[str, str, int | None]:
    """(layout name, hook name, hook layer or None) of a cfg.json."""
    meta = cfg.get("metadata") or {}
    if meta.get("hook_name"):
        layer = meta.get("hook_layer")
        return ("metadata+layer" if layer is not None else "metadata"), meta["hook_name"], layer
    name = cfg.get("hook_name") or cfg.get("hook_point")
    if not name:
        raise UserError("the SAE's cfg.json names no hook (hook_name, hook_point or metadata.hook_name)")
    return "flat", name, cfg.get("hook_layer", cfg.get("hook_point_layer"))


def load_sae(path: str | Path) -> SAE:
    """An SAE from a SAELens folder (any of the three cfg.json layouts)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / CONFIG).exists() or not (path / WEIGHTS).exists():
        raise UserError(f"{path} is not a SAELens folder (needs {CONFIG} and {WEIGHTS})")
    cfg = json.loads((path / CONFIG).read_text())
    layout, hook, layer = _layout(cfg)
    if layer is None:
        m = re.search(r"blocks\.(\d+)\.", hook)
        if not m:
            raise UserError(f"cannot tell the SAE's layer from its hook {hook!r}")
        layer = int(m.group(1))
    w = load_file(str(path / WEIGHTS))
    missing = [k for k in ("W_enc", "W_dec", "b_dec") if k not in w]
    if missing or ("b_enc" not in w and "b_gate" not in w):
        raise UserError(f"{path / WEIGHTS} lacks {', '.join(missing) or 'b_enc'}; found {sorted(w)}")
    W_enc, W_dec = w["W_enc"].float(), w["W_dec"].float()
    if W_enc.shape != W_dec.T.shape or w["b_dec"].shape != (W_enc.shape[0],):
        raise UserError(f"the SAE's shapes disagree: W_enc {tuple(W_enc.shape)}, W_dec {tuple(W_dec.shape)}, b_dec {tuple(w['b_dec'].shape)}")
    arch = cfg.get("architecture") or ("jumprelu" if "threshold" in w else "gated" if "b_gate" in w else "standard")
    b_enc = w["b_gate"] if arch == "gated" else w["b_enc"]  # a gated SAE's gate decides whether a feature is on
    threshold = w["threshold"].float() if "threshold" in w else None
    meta_hook = cfg.get("hook_head_index", (cfg.get("metadata") or {}).get("hook_head_index"))
    if meta_hook is not None:
        raise UserError("SAEs on a single head's activations (hook_head_index) are not supported; use one on the full hook")
    return SAE(
        W_enc,
        W_dec,
        b_enc.float(),
        w["b_dec"].float(),
        hook,
        int(layer),
        arch,
        bool(cfg.get("apply_b_dec_to_input", True)),
        cfg.get("normalize_activations") or "none",
        threshold,
        layout,
        cfg,
    )


def sae_site(model: torch.nn.Module, hook_name: str) -> Site:
    """The model site a TransformerLens hook name reads."""
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook_name)
    if not m:
        raise UserError(f"unsupported SAE hook {hook_name!r}: expected blocks.<layer>.<hook>")
    arch = architecture(model)
    block, hook = arch.block(int(m.group(1))), m.group(2)
    sites = {
        "hook_resid_pre": Site(block, "input"),
        "hook_resid_post": Site(block, "output"),
        "hook_mlp_out": arch.mlp_output(int(m.group(1))),
        "hook_attn_out": Site(f"{block}.{arch.attention}"),
        "attn.hook_z": arch.heads(int(m.group(1))),
        "mlp.hook_post": arch.neurons(int(m.group(1))),
    }
    if hook == "hook_resid_mid":
        if arch.mlp_norm is None:
            raise UserError(f"cannot find the layer norm before the MLP of {block} for hook_resid_mid")
        return Site(f"{block}.{arch.mlp_norm}", "input")
    if hook not in sites:
        raise UserError(f"unsupported SAE hook {hook_name!r}; supported: {', '.join(['hook_resid_mid', *sites])}")
    return sites[hook]


def sae_concept(sae: SAE | str | Path, feature: int, model: torch.nn.Module, use: str = "encoder", name: str | None = None) -> ConceptVector:
    """Feature `feature` of an SAE as a concept at its hook's site: its encoder pre-activation
    (`use="encoder"`) or its decoder direction (`use="decoder"`)."""
    sae = sae if isinstance(sae, SAE) else load_sae(sae)
    if not 0 <= feature < sae.d_sae:
        raise UserError(f"feature {feature} does not exist: the SAE has {sae.d_sae} features (0-{sae.d_sae - 1})")
    if sae.normalize_activations not in ("none", None):
        warnings.warn(
            f"the SAE normalises its inputs ({sae.normalize_activations}); the concept uses the raw direction, "
            "so its values are the pre-activation up to that scaling",
            stacklevel=2,
        )
    if use == "encoder":
        v = sae.W_enc[:, feature]
        bias = float(sae.b_enc[feature] - (sae.b_dec @ v if sae.apply_b_dec_to_input else 0.0))
    elif use == "decoder":
        v, bias = sae.W_dec[feature], 0.0
    else:
        raise UserError(f"an SAE feature is used through its 'encoder' or 'decoder' direction, not {use!r}")
    site = sae_site(model, sae.hook_name)
    info = {"sae_hook": sae.hook_name, "feature": feature, "architecture": sae.architecture, "layout": sae.layout, "layer": sae.layer}
    if sae.threshold is not None:
        info["threshold"] = float(sae.threshold[feature])
    return ConceptVector(v, site, f"sae-{use}", bias, name or f"sae-{sae.layer}-{feature}", info)
