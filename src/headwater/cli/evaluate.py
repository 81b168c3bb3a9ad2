"""`headwater evaluate`: check attributions against retraining (LDS, leave-k-out) and tail-patch."""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import typer

from ..config import H_DATA, H_K, H_MODEL, H_QUERIES, LDSConfig, RetrainConfig, TrainConfig
from ..errors import UserError
from .app import evaluate_app
from .options import command, save_configs

BASELINE_SEED = typer.Option(0, "--baseline-seed", help="Seed of the random records the top records are compared against.")


def training_function(retrain: RetrainConfig, run: TrainConfig):
    """The user's `train_and_measure`, imported from module:function, or the built-in LM replay."""
    if retrain.train == "builtin":
        from ..retrain import RetrainLM

        if not (retrain.init_model and retrain.data and retrain.queries):
            raise UserError("--train builtin needs --init-model, --data and --queries")
        return RetrainLM(retrain.init_model, retrain.data, retrain.queries, run)
    module, _, name = retrain.train.partition(":")
    if "" not in sys.path and os.getcwd() not in sys.path:  # the `headwater` script, unlike `python -m`, leaves out the working directory
        sys.path.insert(0, os.getcwd())
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise UserError(f"cannot import the training function {retrain.train!r}: {exc}") from None


def check_against_data(scores, retrain: RetrainConfig) -> None:
    """Refuse scores whose records or queries are not the retraining's, before any retraining."""
    if retrain.train != "builtin":
        return
    from ..data import load_records

    n, q = len(load_records(retrain.data)), len(load_records(retrain.queries))
    if (scores.n_train, scores.n_queries) != (n, q):
        raise UserError(
            f"the scores cover {scores.n_train} training records × {scores.n_queries} queries, but --data has {n} records "
            f"and --queries {q}: token- or sentence-level rows must be pooled to records (headwater attribute writes record scores)"
        )


def load_scores(path: Path):
    from ..scores import Scores

    return Scores.load(path)


@command(evaluate_app, RetrainConfig, TrainConfig, LDSConfig, name="lds")
def evaluate_lds(
    scores: list[Path] = typer.Option(..., "--scores", help="Scores files of the methods to compare (repeatable)."),
    out: Path | None = typer.Option(None, "--out", help="Also write the results as JSON."),
    configs: dict = None,
):
    """Linear Datamodeling Score of each Scores file, with a t-interval over the queries and the
    seed-noise ceiling."""
    import numpy as np

    from ..metrics import lds, query_interval, seed_ceiling
    from ..retrain import retrain_outcomes, subset_masks

    retrain, run, cfg = configs[RetrainConfig], configs[TrainConfig], configs[LDSConfig]
    loaded = {p.name.split(".")[0]: load_scores(p) for p in scores}
    sizes = {s.n_train for s in loaded.values()}
    if len(sizes) != 1:
        raise UserError(f"the scores files disagree on the number of training records: {sorted(sizes)}")
    masks = subset_masks(sizes.pop(), cfg.subsets, cfg.alpha, cfg.subset_seed)
    fn = training_function(retrain, run)
    for s in loaded.values():
        check_against_data(s, retrain)
    outcomes = retrain_outcomes(fn, masks, list(range(retrain.retrain_seeds)), retrain.processes)
    values = {k: lds(s, masks, outcomes.mean(0)) for k, s in loaded.items()}
    result = {
        "subsets": cfg.subsets,
        "alpha": cfg.alpha,
        "seeds": retrain.retrain_seeds,
        "methods": {k: mean for k, (mean, _) in values.items()},
        "interval_95": {k: query_interval(per) for k, (_, per) in values.items()},
        "per_query": {k: [None if np.isnan(x) else float(x) for x in per] for k, (_, per) in values.items()},  # JSON has no NaN
    }
    if retrain.retrain_seeds >= 2:
        result["seed_ceiling"] = seed_ceiling(outcomes)
    for name, value in result["methods"].items():
        lo, hi = result["interval_95"][name]
        defined = sum(x is not None for x in result["per_query"][name])
        typer.echo(f"{name}: LDS {value:.4f} [{lo:.4f}, {hi:.4f}] (95% t-interval over the {defined} queries with a defined correlation)")
    if "seed_ceiling" in result:
        typer.echo(f"seed ceiling: {result['seed_ceiling']:.4f}")
    if out:
        out.write_text(json.dumps(result, indent=2))
        save_configs(out, retrain, run, cfg)


@command(evaluate_app, RetrainConfig, TrainConfig, name="leave-k-out")
def evaluate_leave_k_out(
    scores: Path = typer.Option(..., "--scores", help="Scores file; its queries are averaged."),
    k: int = typer.Option(10, "--k", help=H_K),
    baseline_seed: int = BASELINE_SEED,
    configs: dict = None,
):
    """Remove the k top proponents vs k random records, retrain, report the change of the mean measurement."""
    from ..retrain import leave_k_out

    retrain, run = configs[RetrainConfig], configs[TrainConfig]
    s = load_scores(scores)
    fn = training_function(retrain, run)
    check_against_data(s, retrain)
    result = leave_k_out(s, k, fn, list(range(retrain.retrain_seeds)), baseline_seed)
    typer.echo(
        f"mean measurement (oriented: higher = more) {result['base']:.4f}; removing the top {k}: "
        f"{result['top_k_removed']:+.4f}; removing {k} random: {result['random_removed']:+.4f}"
    )


@command(evaluate_app, name="tail-patch")
def evaluate_tail_patch(
    scores: Path = typer.Option(..., "--scores", help="Scores file of the queries."),
    model: str = typer.Option(..., "--model", help=H_MODEL),
    data: str = typer.Option(..., "--data", help=H_DATA),
    queries: str = typer.Option(..., "--queries", help=H_QUERIES),
    k: int = typer.Option(10, "--k", help=H_K),
    patch_lr: float = typer.Option(1e-3, "--patch-lr", help="Size of the single SGD step on each record."),
    baseline_seed: int = BASELINE_SEED,
):
    """One SGD step on each top proponent alone: mean increase of the target log-probability vs random records.

    The trained model's local sensitivity, not what a record did in training: it can favour records
    that raise the answer's word in every context (docs/benchmarks.md, fact tracing); retraining
    (lds, leave-k-out) says what data did."""
    from ..data import load_records
    from ..models import load_model
    from ..retrain import tail_patch
    from ..task import LanguageModelTask

    trained, tokenizer = load_model(model)
    result = tail_patch(
        trained, LanguageModelTask(tokenizer), load_records(data), load_records(queries), load_scores(scores), k, patch_lr, baseline_seed
    )
    typer.echo(f"target log-prob change after one step: top {k} {result['top_k']:+.5f}, random {result['random']:+.5f}")
