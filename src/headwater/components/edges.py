"""Edge attribution patching: which component's write to the residual stream matters to which
reader.

A transformer's residual stream is a sum of writes: the embeddings, every head (its slice of the
heads' outputs times its rows of the output projection) and every MLP. Each reader (a layer's
attention, a layer's MLP, the final logits) sees that sum through its own layer norm. The edge
u → d is scored (Δ write_u)ᵀ ∂M/∂x_d, summed over positions, with Δ = clean − corrupt and x_d the
reader's *own* copy of the residual stream (its norm's input, so the gradient flows through that
reader only), on the corrupt run: the denoising sign of `patching.py`. A reader's edges sum to
(Δx_d)ᵀ ∂M/∂x_d, because everything else written to the stream (biases) is the same in both runs.
"""

from __future__ import annotations

import contextlib

import torch

from ..architecture import Architecture, Site, architecture, capture, module_of
from ..errors import UserError
from ..scores import Scores
from .patching import site_activations


def _output_matrix(model: torch.nn.Module, arch: Architecture, layer: int) -> torch.Tensor:
    """The attention output projection as [n_heads × head_dim, d_model] (input rows)."""
    module = module_of(model, arch.heads(layer).module)
    w = module.weight
    return w if type(module).__name__ == "Conv1D" else w.T


def readers(arch: Architecture) -> list[tuple[str, Site, int, str]]:
    """(name, site, layer, kind) of every reader of the residual stream, in order."""
    if arch.attention_norm is None or arch.mlp_norm is None or arch.final_norm is None:
        raise UserError("edge attribution needs the layer norms through which attention, MLPs and the logits read the residual stream")
    out = []
    for layer in range(arch.n_layers):
        block = arch.block(layer)
        out.append((f"L{layer} attn", Site(f"{block}.{arch.attention_norm}", "input"), layer, "attn"))
        out.append((f"L{layer} MLP", Site(f"{block}.{arch.mlp_norm}", "input"), layer, "mlp"))
    out.append(("logits", Site(arch.final_norm, "input"), arch.n_layers, "final"))
    return out


def _reads(reader_layer: int, reader_kind: str, writer_layer: int, writer_kind: str) -> bool:
    """Whether the writer comes before the reader in the residual stream."""
    if writer_kind == "embed":
        return True
    if reader_kind == "final":
        return True
    if writer_layer < reader_layer:
        return True
    return writer_layer == reader_layer and reader_kind == "mlp" and writer_kind == "head"


def reader_gradients(model: torch.nn.Module, behaviour, sites: list[Site]) -> tuple[dict, dict]:
    """(each reader's own residual input, ∂M/∂ of it) on the corrupt run, [N, T, d] each."""
    private = lambda x: x.clone() if x.requires_grad else x.detach().requires_grad_()
    with torch.enable_grad(), contextlib.ExitStack() as stack:
        seen = {s: stack.enter_context(capture(model, s, replace=private)) for s in sites}
        metric = behaviour.metric(model, behaviour.inputs("corrupt"))
        tensors = [seen[s][-1] for s in sites]
        grads = torch.autograd.grad(metric.sum(), tensors, allow_unused=True)
    acts = {s: t.detach() for s, t in zip(sites, tensors)}
    return acts, {s: (g if g is not None else torch.zeros_like(t)).detach() for s, t, g in zip(sites, tensors, grads)}


def edge_attribution_patching(model: torch.nn.Module, behaviour) -> Scores:
    """Scores [edges, pairs], one row per edge named "writer -> reader"."""
    arch = architecture(model)
    head_sites = [arch.heads(layer) for layer in range(arch.n_layers)]
    mlp_sites = [arch.mlp_output(layer) for layer in range(arch.n_layers)]
    embed_site = Site(arch.block(0), "input")
    writers_sites = [embed_site, *head_sites, *mlp_sites]
    clean = site_activations(model, behaviour, "clean", writers_sites)
    corrupt = site_activations(model, behaviour, "corrupt", writers_sites)
    delta = {s: clean[s] - corrupt[s] for s in writers_sites}
    reading = readers(arch)
    _, grads = reader_gradients(model, behaviour, [site for _, site, _, _ in reading])
    names, values = [], []
    for reader, site, r_layer, r_kind in reading:
        g = grads[site]
        names.append(f"embed -> {reader}")
        values.append((delta[embed_site] * g).sum((1, 2)))
        for layer in range(arch.n_layers):
            if _reads(r_layer, r_kind, layer, "head"):
                w = _output_matrix(model, arch, layer).detach().to(g)
                back = g @ w.T  # [N, T, H·dh]: the gradient pulled back through the output projection
                dz = delta[head_sites[layer]]
                d = dz.shape[-1] // arch.n_heads
                for h in range(arch.n_heads):
                    names.append(f"L{layer}H{h} -> {reader}")
                    values.append((dz[..., h * d : (h + 1) * d] * back[..., h * d : (h + 1) * d]).sum((1, 2)))
            if _reads(r_layer, r_kind, layer, "mlp"):
                names.append(f"L{layer} MLP -> {reader}")
                values.append((delta[mlp_sites[layer]] * g).sum((1, 2)))
    return Scores(
        torch.stack(values).double().cpu().numpy(), names, behaviour.ids, method="edge-attribution-patching", measurement=behaviour.describe()
    )


def edge_table(scores: Scores):
    """One row per edge: writer, reader, score (mean over pairs), sorted by |score|."""
    import pandas as pd

    writer, reader = zip(*(name.split(" -> ") for name in scores.train_ids))
    frame = pd.DataFrame({"writer": writer, "reader": reader, "score": scores.values.mean(1)})
    return frame.reindex(frame["score"].abs().sort_values(ascending=False).index).reset_index(drop=True)
