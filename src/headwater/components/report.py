"""Pictures of component attributions: a layers × heads heatmap (with each layer's MLP beside
it) and the faithfulness of the top-n components."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..plots import pyplot


def heatmap(table: pd.DataFrame, path: str | Path, title: str = "attribution (denoising)") -> Path:
    """Heads' scores as a layers × heads grid, and the MLPs' as one more column, from
    `component_table`; a diverging colour scale centred on zero."""
    plt = pyplot()
    heads = table[table["kind"] == "head"]
    mlps = table[table["kind"] == "mlp"]
    layers = int(table["layer"].dropna().max()) + 1
    n_heads = int(heads["index"].max()) + 1 if len(heads) else 0
    grid = np.full((layers, n_heads + (1 if len(mlps) else 0)), np.nan)
    for _, row in heads.iterrows():
        grid[int(row["layer"]), int(row["index"])] = row["score"]
    for _, row in mlps.iterrows():
        grid[int(row["layer"]), -1] = row["score"]
    bound = np.nanmax(np.abs(grid)) or 1.0
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * grid.shape[1], 1.0 + 0.5 * layers))
    im = ax.imshow(grid, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    labels = [f"H{h}" for h in range(n_heads)] + (["MLP"] if len(mlps) else [])
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(layers), [f"L{i}" for i in range(layers)])
    for (i, j), v in np.ndenumerate(grid):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7, color="white" if abs(v) > 0.6 * bound else "black")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def faithfulness_plot(curve: pd.DataFrame, path: str | Path) -> Path:
    """Faithfulness against the number of top components kept."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot(curve["components"], curve["faithfulness"], marker="o")
    ax.axhline(1, color="grey", linewidth=0.6, linestyle="--")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xlabel("top components kept at their clean activations")
    ax.set_ylabel("faithfulness")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
