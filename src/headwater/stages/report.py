"""Pictures of stage effects: a bar chart of each estimator (beside the true effects when known)
and a waterfall of the completeness decomposition from f(θ_0) to f(θ_T)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..plots import pyplot
from .effects import StageEffects


def bar_chart(effects: StageEffects, path: str | Path, truth: np.ndarray | None = None) -> Path:
    """Per behaviour, each stage's effect under every estimator (and the true effect)."""
    plt = pyplot()
    series = {k: v for k, v in effects.estimates.items() if not k.endswith("(linear)")}  # the first-order readouts stay in the tables
    if truth is not None:
        series = {"retrained (true)": truth, **series}
    n_b = len(effects.behaviours)
    fig, axes = plt.subplots(1, n_b, figsize=(4.5 * n_b, 3.6), squeeze=False)
    width = 0.8 / len(series)
    x = np.arange(len(effects.stages))
    for b, ax in enumerate(axes[0]):
        for i, (name, values) in enumerate(series.items()):
            ax.bar(x + (i - (len(series) - 1) / 2) * width, values[:, b], width, label=name)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xticks(x, effects.stages, rotation=20)
        ax.set_title(f"{effects.behaviours[b]}: Δ {effects.measurement.get('name', 'measurement')}")
    axes[0][0].set_ylabel("effect of the stage (kept − skipped)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(series), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def waterfall(effects: StageEffects, path: str | Path) -> Path:
    """Per behaviour, f(θ_0) → each stage's additive change → f(θ_T)."""
    plt = pyplot()
    n_b = len(effects.behaviours)
    fig, axes = plt.subplots(1, n_b, figsize=(4.5 * n_b, 3.6), squeeze=False)
    for b, ax in enumerate(axes[0]):
        start = effects.final[b] - effects.change[b]
        levels = [start]
        ax.bar(0, start, color="grey")
        for k, delta in enumerate(effects.completeness[:, b]):
            ax.bar(k + 1, delta, bottom=levels[-1], color="tab:orange" if delta < 0 else "tab:blue")
            levels.append(levels[-1] + delta)
        ax.bar(len(effects.stages) + 1, effects.final[b], color="grey")
        low, high = min(0.0, *levels), max(0.0, *levels)
        ax.set_ylim(low - 0.05 * (high - low), high + 0.08 * (high - low))
        ax.set_xticks(range(len(effects.stages) + 2), ["start", *effects.stages, "end"], rotation=20)
        ax.set_title(f"{effects.behaviours[b]}: {effects.measurement.get('name', 'measurement')} along the run")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
