"""Index commands: build an index, fit curvature beside it, query it for the top records."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import typer

from ..config import (
    H_DEVICE,
    H_MODEL,
    BM25Config,
    BuildConfig,
    CurvatureConfig,
    GradientConfig,
    InfluenceConfig,
    QueryConfig,
    TracInConfig,
    TrackStarConfig,
    TRAKConfig,
)
from ..errors import UserError
from .app import app
from .options import command, save_configs

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
    path = curvature_file(idx, method.curvature.config)
    typer.echo(f"fitted {len(method.curvature.modules)} modules on {method.curvature.examples} examples: {path}")


METHOD_CONFIGS = (GradientConfig, TrackStarConfig, TracInConfig, InfluenceConfig, TRAKConfig, BM25Config)


@command(app, QueryConfig, *METHOD_CONFIGS)
def query(
    index: list[Path] = typer.Argument(..., help="Index directory (several, with --checkpoint-lr each, for TracIn over checkpoints)."),
    out: Path | None = typer.Option(None, "--out", help="Write results to .csv, .jsonl or .parquet (and the resolved settings beside them)."),
    model: str | None = MODEL_OVERRIDE,
    device: str | None = DEVICE_OVERRIDE,
    configs: dict = None,
):
    """Rank training records by their influence on the queries (exact streaming top-k)."""
    import pandas as pd

    from ..concepts.vector import resolve_measurement
    from ..methods import METHODS
    from ..query import query as run_query
    from ..ranking import write_results

    q = configs[QueryConfig]
    if q.measurement == "concept-rate":
        raise UserError("--measurement concept-rate samples responses per query: use `headwater attribute`")
    if not q.queries:
        raise UserError("give the queries to rank training records for (--queries)")
    if (model or device) and len(index) > 1:
        raise UserError("--model/--device apply to one index; with several (TracIn) each index loads its own model")
    if len(index) > 1 and q.method != "tracin":
        raise UserError(f"several indexes are for --method tracin, not {q.method}")
    indexes = [open_index(p, model, device) for p in index]
    cls = METHODS[q.method]
    method_config = configs[cls.config_class]
    m = cls(None, None, method_config)
    chosen = resolve_measurement(q.measurement, q.probe)
    train = indexes if q.method == "tracin" else indexes[0]
    if q.aggregate:
        frame = m.fit(train).score(q.queries, chosen).mean_query().top_k(q.top_k, q.bottom_k, records=m.fitted().records)
    else:
        pool = None if q.rows else method_config.to_dict().get("pool", "max")
        frame = run_query(train, q.queries, m, q.top_k, q.bottom_k, pool, chosen)
    if out:
        write_results(frame, out)
        save_configs(out, q, method_config)
        typer.echo(f"wrote {len(frame)} rows to {out}")
        return
    with pd.option_context("display.max_colwidth", 60, "display.width", 160):
        typer.echo(frame.drop(columns=["record", "unit"] if not q.rows else ["record"]).to_string(index=False))
