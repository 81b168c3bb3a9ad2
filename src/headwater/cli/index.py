"""Index commands: build an index, fit curvature beside it, query it for the top records."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

import typer

from ..config import (
    H_DEVICE,
    H_MEASUREMENT,
    H_METHOD,
    H_MODEL,
    H_QUERIES,
    H_TOP_K,
    MEASUREMENTS,
    BM25Config,
    BuildConfig,
    CurvatureConfig,
    GradientConfig,
    InfluenceConfig,
    TracInConfig,
    TrackStarConfig,
    TRAKConfig,
)
from ..errors import UserError
from .app import app
from .options import command

QUERY_METHODS = ("dot", "cosine", "trackstar", "tracin", "ekfac", "kfac", "trak", "bm25")
PROGRESS = typer.Option(True, "--progress/--no-progress", help="Show progress bars.")


@command(app, BuildConfig)
def build(
    index: Path = typer.Argument(..., help="Directory to write the index to."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted build (or reuse a completed one)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete an existing index at this path first."),
    nproc: int = typer.Option(1, "--nproc", help="Processes to build with (launches torchrun on this machine)."),
    progress: bool = PROGRESS,
    configs: dict = None,
):
    """Collect per-example gradients of the training data into an on-disk index."""
    from ..build import build_index
    from ..store import prepare_directory

    cfg = configs[BuildConfig]
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        # Catch bad flags, data and directory state here, so a multi-process build fails with one
        # line instead of one torchrun traceback per rank.
        if not cfg.model or not cfg.data:
            raise UserError("a build needs --model and --data")
        prepare_directory(index, resume, overwrite, dry_run=True)
        from ..data import load_records

        load_records(cfg.data)
        argv, args = iter(sys.argv[1:]), []
        for a in argv:  # drop --nproc N / --nproc=N; torchrun's workers see WORLD_SIZE instead
            if a == "--nproc":
                next(argv, None)
            elif not a.startswith("--nproc="):
                args.append(a)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "headwater", *args]
        raise typer.Exit(subprocess.call(cmd))
    idx = build_index(index, config=cfg, resume=resume, overwrite=overwrite, progress=progress)
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"built {idx}")


def open_index(path: Path, model: str | None = None, device: str | None = None):
    from ..index import Index

    idx = Index(path)
    if model or device:
        idx.use_model(model, device)
    return idx


MODEL_OVERRIDE = typer.Option(None, "--model", help=H_MODEL + " Default: the index's own.")
DEVICE_OVERRIDE = typer.Option(None, "--device", help=H_DEVICE + " Default: the index's own.")


@command(app, CurvatureConfig)
def curvature(
    index: Path = typer.Argument(..., help="Index directory; the factors are saved in it, keyed by these settings."),
    model: str | None = MODEL_OVERRIDE,
    device: str | None = DEVICE_OVERRIDE,
    progress: bool = PROGRESS,
    configs: dict = None,
):
    """Fit KFAC / EK-FAC curvature on the index's training records, for `--method ekfac|kfac`."""
    from ..methods import EKFAC
    from ..methods.influence import curvature_file

    idx = open_index(index, model, device)
    config = InfluenceConfig(curvature=configs[CurvatureConfig])
    method = EKFAC(config=config).fit(idx, progress=progress)
    typer.echo(f"fitted {len(method.curvature.modules)} modules on {method.curvature.examples} examples: {curvature_file(idx, config)}")


METHOD_CONFIGS = (GradientConfig, TrackStarConfig, TracInConfig, InfluenceConfig, TRAKConfig, BM25Config)


@command(app, *METHOD_CONFIGS)
def query(
    index: list[Path] = typer.Argument(..., help="Index directory (several, with --checkpoint-lr each, for TracIn over checkpoints)."),
    queries: str = typer.Option(..., "--queries", help=H_QUERIES),
    method: Literal[QUERY_METHODS] = typer.Option("cosine", "--method", help=H_METHOD),
    measurement: Literal[MEASUREMENTS] = typer.Option("default", "--measurement", help=H_MEASUREMENT),
    top_k: int = typer.Option(10, "--top-k", help=H_TOP_K),
    bottom_k: int = typer.Option(0, "--bottom-k", help="Also keep the most opposing records."),
    rows: bool = typer.Option(False, "--rows", help="Rank the stored rows (sentences, tokens) themselves instead of pooling them per record."),
    aggregate: bool = typer.Option(False, "--aggregate", help="Attribute the whole query set at once (the mean over queries)."),
    out: Path | None = typer.Option(None, "--out", help="Write results to .csv, .jsonl or .parquet."),
    model: str | None = MODEL_OVERRIDE,
    device: str | None = DEVICE_OVERRIDE,
    configs: dict = None,
):
    """Rank training records by their influence on the queries (exact streaming top-k)."""
    import pandas as pd

    from ..measurement import measurement_named
    from ..methods import METHODS
    from ..query import query as run_query
    from ..ranking import write_results

    if (model or device) and len(index) > 1:
        raise UserError("--model/--device apply to one index; with several (TracIn) each index loads its own model")
    if len(index) > 1 and method != "tracin":
        raise UserError(f"several indexes are for --method tracin, not {method}")
    indexes = [open_index(p, model, device) for p in index]
    cls = METHODS[method]
    m = cls(None, None, configs[cls.config_class])
    chosen = None if measurement == "default" else measurement_named(measurement)
    train = indexes if method == "tracin" else indexes[0]
    if aggregate:
        frame = m.fit(train).score(queries, chosen).mean_query().top_k(top_k, bottom_k, records=m.fitted().records)
    else:
        pool = None if rows else configs[cls.config_class].to_dict().get("pool", "max")
        frame = run_query(train, queries, m, top_k, bottom_k, pool, chosen)
    if out:
        write_results(frame, out)
        typer.echo(f"wrote {len(frame)} rows to {out}")
        return
    with pd.option_context("display.max_colwidth", 60, "display.width", 160):
        typer.echo(frame.drop(columns=["record", "unit"] if not rows else ["record"]).to_string(index=False))
