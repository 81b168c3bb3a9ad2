"""`headwater components`: which heads, MLPs and neurons carry a behaviour given as clean/corrupt pairs."""

from __future__ import annotations

from pathlib import Path

import typer

from ..components.config import ComponentConfig
from ..errors import UserError
from .app import app
from .options import command, save_configs


@command(app, ComponentConfig)
def components(
    out: Path = typer.Option(..., "--out", help="Directory for components.csv, scores.safetensors, heatmap.png, faithfulness.csv/png (edges.csv)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    configs: dict = None,
):
    """Attribute a behaviour to components by attribution patching (denoising: each component's
    clean activation patched into the corrupt run), check the top ones by exact patching, and
    measure how faithful the top-n set is."""
    import pandas as pd

    from ..components import (
        PromptPairs,
        attribution_patching,
        component_table,
        edge_attribution_patching,
        edge_table,
        exact_patching,
        faithfulness_curve,
        transformer_components,
    )
    from ..components.report import faithfulness_plot, heatmap
    from ..concepts.vector import resolve_measurement
    from ..data import load_records
    from ..models import load_model

    c = configs[ComponentConfig]
    for flag, value in (("--model", c.model), ("--clean", c.clean), ("--corrupt", c.corrupt)):
        if not value:
            raise UserError(f"give {flag}")
    metric = resolve_measurement("concept", c.probe) if c.metric == "concept" else "logit-diff"
    if c.metric != "concept" and c.probe:
        raise UserError("--probe is read by --metric concept")
    clean, corrupt = load_records(c.clean), load_records(c.corrupt)
    model, tokenizer = load_model(c.model, c.device, c.model_dtype)
    pairs = PromptPairs.from_records(tokenizer, [dict(r) for r in clean], [dict(r) for r in corrupt], metric)
    units = transformer_components(model, tuple(c.kinds))
    scores = attribution_patching(model, pairs, units, c.patching, c.steps, progress)
    table = component_table(units, scores)
    top = [u for u in units if u.name in set(table["component"][: c.verify])]
    exact = exact_patching(model, pairs, top, progress) if top else None
    table = component_table(units, scores, exact)
    out.mkdir(parents=True, exist_ok=True)
    scores.save(out / "scores.safetensors")
    table.to_csv(out / "components.csv", index=False)
    heatmap(table, out / "heatmap.png", f"{scores.method}: {pairs.name} (denoising)")
    order = table["component"].tolist()
    sizes = sorted({0, 1, 2, 3, 5, 10, 20, 50, len(order)} & set(range(len(order) + 1)))
    curve = faithfulness_curve(model, pairs, units, order, sizes)
    curve.to_csv(out / "faithfulness.csv", index=False)
    faithfulness_plot(curve, out / "faithfulness.png")
    if c.edges:
        edge_table(edge_attribution_patching(model, pairs)).to_csv(out / "edges.csv", index=False)
    save_configs(out / "components", c)
    with pd.option_context("display.width", 160, "display.float_format", "{:+.4f}".format):
        typer.echo(table.head(15).to_string(index=False))
    if exact is not None:
        from scipy.stats import spearmanr

        checked = table.dropna(subset=["exact"])
        if len(checked) > 2:
            rho = spearmanr(checked["score"], checked["exact"]).statistic
            typer.echo(f"top {len(checked)} components: Spearman(attribution, exact patching) = {rho:+.3f}")
    typer.echo(f"faithfulness of the top 3: {curve.set_index('components')['faithfulness'].get(3, float('nan')):.3f}; wrote {out}")
