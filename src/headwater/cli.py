"""The `headwater` command line: build, query, demo.

User errors (bad files, mismatched indexes, bad flags) exit with status 2 and one line on stderr;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Attribute a model's behaviour to its training data.")

# One vocabulary for every command.
MODEL = typer.Option(None, "--model", help="Model: a local path or hub id of a causal LM (AutoModelForCausalLM).")
DATA = typer.Option(None, "--data", help="Training records: .jsonl/.csv/.parquet file, a save_to_disk directory, or a hub data set name.")
PROJECTION = typer.Option(None, "--projection", help="Gradient compression: factored (LoGra, default), dense or none.")
PROJECTION_DIM = typer.Option(None, "--projection-dim", help="Projected dimensions per tracked module (factored: k_out·k_in). Default 4096.")
SEED = typer.Option(None, "--seed", help="Seed of the random projections (default 0).")
BATCH_SIZE = typer.Option(None, "--batch-size", help="Examples per forward/backward pass (default 8).")
DEVICE = typer.Option(None, "--device", help="Torch device, e.g. cpu or cuda (default cpu).")
DTYPE = typer.Option(None, "--dtype", help="Storage precision: float16 (default), bfloat16 or float32.")


def _fail(message: str) -> None:
    message = " ".join(str(message).split())  # one line, even for multi-line messages of other libraries
    typer.echo(f"headwater: error: {message}", err=True)
    raise typer.Exit(2)


def _build_config(config_file: Optional[Path], **flags):
    """Config from a saved config.json (for replay), overridden by the flags given."""
    from .build import BuildConfig
    from .store import read_json

    base = read_json(config_file) if config_file else {}
    base.update({k: v for k, v in flags.items() if v is not None})
    return BuildConfig.from_dict(base)


@app.command()
def build(
    index: Path = typer.Argument(..., help="Directory to write the index to."),
    model: Optional[str] = MODEL,
    data: Optional[str] = DATA,
    projection: Optional[str] = PROJECTION,
    projection_dim: Optional[int] = PROJECTION_DIM,
    seed: Optional[int] = SEED,
    batch_size: Optional[int] = BATCH_SIZE,
    device: Optional[str] = DEVICE,
    dtype: Optional[str] = DTYPE,
    modules: Optional[list[str]] = typer.Option(None, "--modules", help="Glob of module names to track (repeatable); default: linear layers inside the blocks."),
    unit: Optional[str] = typer.Option(None, "--unit", help="Attribution unit: document (default) or sentence (one row per sentence; scores pooled per document)."),
    format: Optional[str] = typer.Option(None, "--format", help="Record format: auto (default), text, prompt_completion or messages."),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Truncate examples to this many tokens (default: the tokenizer's limit)."),
    optimizer_state: Optional[str] = typer.Option(None, "--optimizer-state", help="Adam/AdamW or Adafactor state_dict file: divide gradients by √(second moment)."),
    shard_rows: Optional[int] = typer.Option(None, "--shard-rows", help="Rows per shard (default: about 128 MiB per shard)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Replay a saved config.json (flags given here override it)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted build (or reuse a completed one)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete an existing index at this path first."),
    nproc: int = typer.Option(1, "--nproc", help="Processes to build with (launches torchrun on this machine)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
):
    """Collect per-example gradients of the training data into an on-disk index."""
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        _check_before_launch(index, config, resume, overwrite, model=model, data=data, projection=projection,
                             projection_dim=projection_dim, dtype=dtype, batch_size=batch_size, unit=unit)
        argv, args = iter(sys.argv[1:]), []
        for a in argv:  # drop --nproc N / --nproc=N; torchrun's workers see WORLD_SIZE instead
            if a == "--nproc":
                next(argv, None)
            elif not a.startswith("--nproc="):
                args.append(a)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "headwater", *args]
        raise typer.Exit(subprocess.call(cmd))
    from .build import build_index

    try:
        cfg = _build_config(
            config, model=model, data=data, projection=projection, projection_dim=projection_dim, seed=seed,
            batch_size=batch_size, device=device, dtype=dtype, modules=modules or None, unit=unit, format=format,
            max_length=max_length, optimizer_state=optimizer_state, shard_rows=shard_rows,
        )
        idx = build_index(index, config=cfg, resume=resume, overwrite=overwrite, progress=progress)
    except UserError as exc:
        _fail(str(exc))
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"built {idx}")


def _check_before_launch(index: Path, config: Optional[Path], resume: bool, overwrite: bool, **flags) -> None:
    """Catch bad flags, data and directory state in the parent, so a multi-process build fails with
    one line instead of one torchrun traceback per rank."""
    from .data import load_records
    from .store import prepare_directory

    try:
        cfg = _build_config(config, **flags)
        if not cfg.model or not cfg.data:
            raise UserError("a build needs --model and --data")
        prepare_directory(index, resume, overwrite, dry_run=True)
        load_records(cfg.data)
    except UserError as exc:
        _fail(str(exc))


@app.command()
def query(
    index: list[Path] = typer.Argument(..., help="Index directory (several, with --lr each, for TracIn over checkpoints)."),
    queries: str = typer.Option(..., "--queries", help="Query records (same formats as --data): the behaviour to attribute."),
    top_k: int = typer.Option(10, "--top-k", help="Training records to keep per query, best first."),
    bottom_k: int = typer.Option(0, "--bottom-k", help="Also keep the most opposing records."),
    method: str = typer.Option("cosine", "--method", help="dot, cosine, trackstar, ekfac or kfac (influence functions; run `headwater curvature` first), or tracin with several indexes."),
    aggregate: bool = typer.Option(False, "--aggregate", help="Score the mean of the normalised query gradients once (a whole benchmark)."),
    pool: str = typer.Option("max", "--pool", help="Pooling of a record's rows for sentence-unit indexes: max, mean or sum."),
    lr: Optional[list[float]] = typer.Option(None, "--lr", help="Learning rate of each checkpoint's index, for TracIn."),
    mix: str = typer.Option("auto", "--mix", help="TrackStar: weight of the query autocorrelation (auto = eigenvalue matching)."),
    damping: Optional[float] = typer.Option(None, "--damping", help="Damping as a fraction of the mean eigenvalue (TrackStar default 0.1; ekfac/kfac default: the curvature's)."),
    cg_steps: int = typer.Option(0, "--cg-steps", help="ekfac/kfac: refine the inverse-Hessian-vector product by this many conjugate-gradient steps."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write results to .csv, .jsonl or .parquet."),
    model: Optional[str] = MODEL,
    batch_size: Optional[int] = BATCH_SIZE,
    device: Optional[str] = DEVICE,
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check shard checksums before scoring."),
):
    """Rank training records by their influence on the queries."""
    from .index import Index
    from .query import write_results

    try:
        indexes = [Index(p) for p in index]
        options = _method_options(method, mix, damping, cg_steps)
        if (model or device) and len(indexes) > 1:
            raise UserError("--model/--device apply to one index; with several (TracIn) each index loads its own model")
        if len(indexes) > 1 or method == "tracin":
            from .methods.tracin import tracin

            frame = tracin(indexes, queries, lrs=lr, top_k=top_k, bottom_k=bottom_k, pool=pool, verify=verify)
        else:
            idx = indexes[0]
            _override_model(idx, model, device)
            frame = idx.query(
                queries, method=method, top_k=top_k, bottom_k=bottom_k, aggregate=aggregate, pool=pool,
                verify=verify, batch_size=batch_size, **options,
            )
        if out:
            write_results(frame, out)
    except UserError as exc:
        _fail(str(exc))
    except ValueError as exc:
        _fail(f"bad value: {exc}")
    if out:
        typer.echo(f"wrote {len(frame)} rows to {out}")
    else:
        import pandas as pd

        with pd.option_context("display.max_colwidth", 60, "display.width", 160):
            typer.echo(frame.drop(columns=["record", "unit"]).to_string(index=False))


def _method_options(method: str, mix: str, damping: float | None, cg_steps: int) -> dict:
    if method == "trackstar":
        return {"mix": mix if mix == "auto" else float(mix), "damping": 0.1 if damping is None else damping}
    if method in ("ekfac", "kfac"):
        return {"cg_steps": cg_steps, "damping": damping}
    return {}


@app.command()
def curvature(
    index: Path = typer.Argument(..., help="Index directory; the factors are saved in it as curvature.safetensors."),
    fisher: str = typer.Option("true", "--fisher", help="true (labels sampled from the model) or empirical (data labels)."),
    damping: float = typer.Option(0.1, "--damping", help="Damping as a fraction of each module's mean eigenvalue."),
    max_examples: Optional[int] = typer.Option(None, "--max-examples", help="Fit on a random sample of this many examples (default: all)."),
    batch_size: Optional[int] = BATCH_SIZE,
    seed: Optional[int] = SEED,
    model: Optional[str] = MODEL,
    device: Optional[str] = DEVICE,
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
):
    """Fit EK-FAC curvature on the index's training data, for `query --method ekfac|kfac`."""
    from .curvature import CurvatureConfig
    from .index import Index

    try:
        idx = Index(index)
        _override_model(idx, model, device)
        config = CurvatureConfig(fisher=fisher, damping=damping, batch_size=batch_size or idx.config.batch_size, max_examples=max_examples, seed=seed or 0)
        curv = idx.fit_curvature(config, progress=progress)
    except UserError as exc:
        _fail(str(exc))
    typer.echo(f"fitted {len(curv.modules)} modules on {curv.examples} examples: {idx.curvature_path}")


@app.command()
def scores(
    index: Path = typer.Argument(..., help="Index directory."),
    queries: str = typer.Option(..., "--queries", help="Query records."),
    out: Path = typer.Option(..., "--out", help="Where to write the dense score matrix, training rows × queries (.npy)."),
    method: str = typer.Option("cosine", "--method", help="dot, cosine, trackstar, ekfac or kfac."),
    mix: str = typer.Option("auto", "--mix", help="TrackStar: weight of the query autocorrelation (auto = eigenvalue matching)."),
    damping: Optional[float] = typer.Option(None, "--damping", help="As for query."),
    cg_steps: int = typer.Option(0, "--cg-steps", help="ekfac/kfac: conjugate-gradient refinement steps."),
    model: Optional[str] = MODEL,
    batch_size: Optional[int] = BATCH_SIZE,
    device: Optional[str] = DEVICE,
):
    """Write every training row's score for every query as a .npy matrix (input to `evaluate lds`)."""
    import numpy as np

    from .index import Index

    try:
        if out.suffix != ".npy":
            raise UserError(f"--out must be a .npy file, got {out}")
        idx = Index(index)
        _override_model(idx, model, device)
        matrix = idx.scores(queries, method=method, batch_size=batch_size, **_method_options(method, mix, damping, cg_steps))
        out.parent.mkdir(parents=True, exist_ok=True)
        np.save(out, matrix)
    except UserError as exc:
        _fail(str(exc))
    typer.echo(f"wrote scores {matrix.shape} to {out}")


def _override_model(idx, model: str | None, device: str | None) -> None:
    if model or device:
        from .build import load_model

        idx._model, idx._tokenizer = load_model(model or idx.config.model, device or idx.config.device)


@app.command()
def attribute(
    method: str = typer.Option(..., "--method", help="trak, source or magic."),
    model: str = typer.Option(..., "--model", help="The model to attribute (SOURCE: the final model; MAGIC: the run's initial model)."),
    data: str = typer.Option(..., "--data", help="Training records, in the order training saw them (MAGIC replays that run)."),
    queries: str = typer.Option(..., "--queries", help="Query records."),
    out: Path = typer.Option(..., "--out", help="Dense score matrix, training records × queries (.npy)."),
    top_k: int = typer.Option(0, "--top-k", help="Also write the top-k training records per query next to --out (.csv)."),
    ensemble: Optional[list[str]] = typer.Option(None, "--ensemble", help="TRAK: further independently trained models (repeatable)."),
    damping: Optional[float] = typer.Option(None, "--damping", help="TRAK: ridge as a multiple of the kernel's mean eigenvalue (default 1)."),
    checkpoint: Optional[list[str]] = typer.Option(None, "--checkpoint", help="SOURCE: the run's checkpoints in order (repeatable)."),
    trainer_state: Optional[str] = typer.Option(None, "--trainer-state", help="SOURCE: a Hugging Face trainer_state.json giving learning rates and steps."),
    lr: Optional[list[float]] = typer.Option(None, "--lr", help="SOURCE: learning rate of each checkpoint's segment; MAGIC: the learning rate."),
    steps: Optional[list[int]] = typer.Option(None, "--steps", help="SOURCE: optimizer steps of each checkpoint's segment."),
    momentum: float = typer.Option(0.0, "--momentum", help="SOURCE / MAGIC (SGD): heavy-ball momentum."),
    optimizer: str = typer.Option("adamw", "--optimizer", help="MAGIC: sgd or adamw."),
    epochs: int = typer.Option(1, "--epochs", help="MAGIC: epochs of the replayed run."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="MAGIC: weight decay."),
    clip_norm: Optional[float] = typer.Option(None, "--clip-norm", help="MAGIC: gradient clipping norm."),
    mean_query: bool = typer.Option(False, "--mean-query", help="MAGIC: differentiate the mean query loss once (one column)."),
    projection_dim: int = typer.Option(1024, "--projection-dim", help="TRAK: projected dimensions per tracked module."),
    seed: int = typer.Option(0, "--seed", help="Projection seed (TRAK); data-order seed of the replayed run (MAGIC)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Examples per pass (MAGIC: the training batch size)."),
    device: str = typer.Option("cpu", "--device", help="Torch device."),
):
    """TRAK over an ensemble, SOURCE over a run's checkpoints, or MAGIC through a replayed run."""
    import numpy as np

    from .attribute import attribute as run_attribute
    from .methods.magic import TrainingRun

    try:
        if out.suffix != ".npy":
            raise UserError(f"--out must be a .npy file, got {out}")
        recipe = None
        if method == "magic":
            if not lr or len(lr) != 1:
                raise UserError("MAGIC needs exactly one --lr")
            recipe = TrainingRun(optimizer, lr[0], epochs, batch_size, momentum, weight_decay=weight_decay, clip_norm=clip_norm, seed=seed)
        matrix = run_attribute(
            method, model, data, queries, device, batch_size, projection_dim, seed, ensemble, damping, checkpoint,
            trainer_state, lr, steps, momentum, recipe, per_query=not mean_query,
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        np.save(out, matrix)
        if top_k:
            _write_top_k(matrix, data, queries, top_k, out.with_suffix(".csv"), mean_query and method == "magic")
    except UserError as exc:
        _fail(str(exc))
    typer.echo(f"wrote scores {matrix.shape} to {out}")


def _write_top_k(matrix, data: str, queries: str, k: int, path: Path, mean: bool) -> None:
    import numpy as np
    import torch

    from .data import load_records, record_ids, record_text
    from .query import rank, results_frame, write_results

    train = load_records(data)
    ids = np.stack([np.arange(len(train)), np.zeros(len(train), dtype=np.int64)], 1)
    ranking = rank(iter([(0, ids, torch.from_numpy(matrix))]), k)
    query_ids = ["mean"] if mean else record_ids(load_records(queries))
    write_results(results_frame(ranking, query_ids, ids, record_ids(train), lambda r, n: record_text(train[int(r)], n)), path)


evaluate_app = typer.Typer(no_args_is_help=True, help="Validate attributions against retraining.")
app.add_typer(evaluate_app, name="evaluate")


TRAIN_HELP = ("module:function taking (mask: a boolean array over training examples, seed: int) and returning the "
              "targets' losses after training on the masked subset; or 'builtin' to replay a causal-LM recipe "
              "(--model, --data, --targets, --optimizer, --lr, --epochs, --batch-size).")


def _training_function(train: str, model, data, targets, optimizer, lr, epochs, batch_size, momentum, weight_decay):
    """The user's `train_and_measure`, imported from module:function, or the built-in LM recipe."""
    import importlib

    if train == "builtin":
        from .evaluate import RetrainLM
        from .methods.magic import TrainingRun

        if not (model and data and targets):
            raise UserError("--train builtin needs --model, --data and --targets")
        return RetrainLM(model, data, targets, TrainingRun(optimizer, lr, epochs, batch_size, momentum, weight_decay=weight_decay))
    module, _, name = train.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise UserError(f"cannot import the training function {train!r}: {exc}") from None


# Retraining flags shared by `evaluate lds` and `evaluate leave-k-out`.
TRAIN = typer.Option(..., "--train", help=TRAIN_HELP)
R_MODEL = typer.Option(None, "--model", help="builtin: the model every retraining starts from (tail-patch: the trained model).")
R_DATA = typer.Option(None, "--data", help="builtin: the training records (rows of the score matrices).")
R_TARGETS = typer.Option(None, "--targets", help="builtin: the target records whose losses are measured.")
R_OPTIMIZER = typer.Option("adamw", "--optimizer", help="builtin: sgd or adamw.")
R_LR = typer.Option(1e-3, "--lr", help="builtin: learning rate (tail-patch: the step size).")
R_EPOCHS = typer.Option(1, "--epochs", help="builtin: epochs.")
R_BATCH = typer.Option(8, "--batch-size", help="builtin: batch size.")
R_MOMENTUM = typer.Option(0.0, "--momentum", help="builtin: SGD momentum.")
R_DECAY = typer.Option(0.0, "--weight-decay", help="builtin: weight decay.")


@evaluate_app.command("lds")
def evaluate_lds(
    scores: list[Path] = typer.Option(..., "--scores", help="Score matrices, training examples × targets (.npy), one per method (repeatable)."),
    train: str = TRAIN,
    model: Optional[str] = R_MODEL,
    data: Optional[str] = R_DATA,
    targets: Optional[str] = R_TARGETS,
    optimizer: str = R_OPTIMIZER,
    lr: float = R_LR,
    epochs: int = R_EPOCHS,
    batch_size: int = R_BATCH,
    momentum: float = R_MOMENTUM,
    weight_decay: float = R_DECAY,
    subsets: int = typer.Option(50, "--subsets", help="Random training subsets (m)."),
    alpha: float = typer.Option(0.5, "--alpha", help="Fraction of the training set in each subset."),
    seeds: int = typer.Option(2, "--seeds", help="Training seeds per subset (≥ 2 gives the seed-noise ceiling)."),
    processes: int = typer.Option(1, "--processes", help="Retraining processes."),
    seed: int = typer.Option(0, "--seed", help="Seed of the subset draw."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the results as JSON."),
):
    """Linear Datamodeling Score of each score matrix, with the seed-noise ceiling."""
    import json

    import numpy as np

    from .evaluate import lds, retrain_losses, seed_ceiling, subset_masks

    try:
        fn = _training_function(train, model, data, targets, optimizer, lr, epochs, batch_size, momentum, weight_decay)
        matrices = {p.stem: np.load(p) for p in scores}
        sizes = {m.shape[0] for m in matrices.values()}
        if len(sizes) != 1:
            raise UserError(f"score matrices disagree on the number of training examples: {sorted(sizes)}")
        masks = subset_masks(sizes.pop(), subsets, alpha, seed)
        losses = retrain_losses(fn, masks, list(range(seeds)), processes)
        result = {"subsets": subsets, "alpha": alpha, "seeds": seeds, "methods": {k: lds(m, masks, losses.mean(0))[0] for k, m in matrices.items()}}
        if seeds >= 2:
            result["seed_ceiling"] = seed_ceiling(losses)
    except UserError as exc:
        _fail(str(exc))
    for name, value in result["methods"].items():
        typer.echo(f"{name}: LDS {value:.4f}")
    if "seed_ceiling" in result:
        typer.echo(f"seed ceiling: {result['seed_ceiling']:.4f}")
    if out:
        out.write_text(json.dumps(result, indent=2))


@evaluate_app.command("leave-k-out")
def evaluate_leave_k_out(
    scores: Path = typer.Option(..., "--scores", help="Score matrix, training examples × targets (.npy); targets are averaged."),
    k: int = typer.Option(10, "--k", help="How many examples to remove."),
    train: str = TRAIN,
    model: Optional[str] = R_MODEL,
    data: Optional[str] = R_DATA,
    targets: Optional[str] = R_TARGETS,
    optimizer: str = R_OPTIMIZER,
    lr: float = R_LR,
    epochs: int = R_EPOCHS,
    batch_size: int = R_BATCH,
    momentum: float = R_MOMENTUM,
    weight_decay: float = R_DECAY,
    seeds: int = typer.Option(2, "--seeds", help="Retraining seeds."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random removal."),
):
    """Remove the k top proponents vs k random examples, retrain, report the change of the mean target loss."""
    import numpy as np

    from .evaluate import leave_k_out

    try:
        fn = _training_function(train, model, data, targets, optimizer, lr, epochs, batch_size, momentum, weight_decay)
        result = leave_k_out(np.load(scores).mean(1), k, fn, list(range(seeds)), seed)
    except UserError as exc:
        _fail(str(exc))
    typer.echo(f"mean target loss {result['base_loss']:.4f}; removing the top {k}: {result['top_k_removed']:+.4f}; removing {k} random: {result['random_removed']:+.4f}")


@evaluate_app.command("tail-patch")
def evaluate_tail_patch(
    scores: Path = typer.Option(..., "--scores", help="Score matrix, training examples × queries (.npy)."),
    model: str = typer.Option(..., "--model", help="The trained model the scores are about."),
    data: str = typer.Option(..., "--data", help="The training records."),
    queries: str = typer.Option(..., "--queries", help="The queries (their completions are the targets)."),
    k: int = typer.Option(10, "--k", help="Top proponents (and random examples) per query."),
    lr: float = typer.Option(1e-3, "--lr", help="Size of the single SGD step."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random baseline."),
):
    """One SGD step on each top proponent alone: mean increase of the target log-probability vs random examples."""
    import numpy as np

    from .build import load_model
    from .data import load_records
    from .evaluate import tail_patch
    from .task import LanguageModelTask

    try:
        trained, tokenizer = load_model(model)
        result = tail_patch(trained, LanguageModelTask(tokenizer), load_records(data), load_records(queries), np.load(scores), k, lr, seed)
    except UserError as exc:
        _fail(str(exc))
    typer.echo(f"target log-prob change after one step: top {k} {result['top_k']:+.5f}, random {result['random']:+.5f}")


@app.command()
def demo(
    workdir: Path = typer.Option(Path("headwater-demo"), "--workdir", help="Where the corpus, model cache, indexes and results go."),
    seed: int = typer.Option(0, "--seed", help="Seed of the corpus, training and projections."),
    projection_dim: int = typer.Option(256, "--projection-dim", help="Projected dimensions per tracked module."),
    batch_size: int = typer.Option(16, "--batch-size", help="Examples per gradient pass."),
    retrain: bool = typer.Option(False, "--retrain", help="Train the demo model again even if cached."),
):
    """Built-in end-to-end example: synthetic facts, a tiny GPT-2, fact tracing vs BM25 (no downloads)."""
    from .demo import run_demo

    try:
        run_demo(workdir, seed=seed, projection_dim=projection_dim, batch_size=batch_size, retrain=retrain)
    except UserError as exc:
        _fail(str(exc))


def main() -> None:
    app()
