"""`headwater stages`: which stage of a recorded run is accountable for each behaviour."""

from __future__ import annotations

from pathlib import Path

import typer

from ..config import H_DEVICE, H_MODEL
from ..errors import UserError
from ..stages.config import StageConfig
from .app import app
from .options import command, save_configs


def named_files(values: list[str], what: str) -> dict[str, str]:
    """NAME=path pairs (a bare path is named by its file's stem)."""
    out = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = Path(value).stem, value
        if name in out:
            raise UserError(f"two {what} are named {name!r}")
        out[name] = path
    return out


@command(app, StageConfig)
def stages(
    trajectory: Path = typer.Argument(..., help="A run directory recorded by TrajectoryRecorder (or made by reconstruct)."),
    model: str = typer.Option(..., "--model", help=H_MODEL),
    behaviour: list[str] = typer.Option(
        ..., "--behaviour", help="A behaviour: NAME=records (.jsonl/.csv/.parquet), or a records file named by its stem (repeatable)."
    ),
    stage_data: list[str] | None = typer.Option(
        None, "--stage-data", help="STAGE=records the stage trained on (repeatable): enables the curvature estimator and --records."
    ),
    records: str | None = typer.Option(
        None, "--records", help="Also resolve this stage's effect to its training records (a scores file and CSV in --out)."
    ),
    out: Path = typer.Option(..., "--out", help="Directory for effects.json/.csv, bars.png, waterfall.png (and the resolved settings beside it)."),
    device: str = typer.Option("cpu", "--device", help=H_DEVICE),
    configs: dict = None,
):
    """Estimate every stage's effect on every behaviour (naive, propagated, curvature-aware) beside
    the additive completeness decomposition; plots and tables in --out."""
    import pandas as pd

    from ..data import load_records
    from ..models import load_model
    from ..stages import StageAttribution, Trajectory
    from ..stages.report import bar_chart, waterfall
    from ..task import LanguageModelTask

    config = configs[StageConfig]
    traj = Trajectory(trajectory)
    behaviours = {name: load_records(path) for name, path in named_files(behaviour, "behaviours").items()}
    data = {name: load_records(path) for name, path in named_files(stage_data or [], "stage data").items()}
    trained, tokenizer = load_model(model, device)
    attribution = StageAttribution(traj, trained, LanguageModelTask(tokenizer), config, data)
    effects = attribution.effects(behaviours)
    effects.save(out)
    bar_chart(effects, out / "bars.png")
    waterfall(effects, out / "waterfall.png")
    save_configs(out, config)
    frame = effects.frame().pivot_table(index=["behaviour", "stage"], columns="estimator", values="effect", sort=False)
    with pd.option_context("display.width", 160, "display.float_format", "{:+.4f}".format):
        typer.echo(frame.to_string())
    if effects.ignores:
        typer.echo("not modelled: " + "; ".join(effects.ignores))
    if records:
        scores = attribution.records(records, behaviours)
        scores.save(out / f"records-{records}.safetensors")
        scores.top_k(10, 10, records=data[records]).to_csv(out / f"records-{records}.csv", index=False)
        typer.echo(f"wrote the records of {records!r}: {out / f'records-{records}.safetensors'}")
    typer.echo(f"wrote {out}")
