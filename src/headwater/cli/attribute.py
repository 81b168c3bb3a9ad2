"""`headwater attribute`: any method, on training records or indexes, written as a Scores file."""

from __future__ import annotations

import re
from pathlib import Path

import typer

from ..concepts.config import ProbeConfig
from ..config import (
    AttributeConfig,
    BM25Config,
    GradientConfig,
    InfluenceConfig,
    MagicConfig,
    SourceConfig,
    TracInConfig,
    TrackStarConfig,
    TRAKConfig,
)
from ..errors import UserError
from .app import app
from .index import open_index
from .options import command, save_configs

CONFIGS = (
    AttributeConfig,
    GradientConfig,
    TrackStarConfig,
    TracInConfig,
    InfluenceConfig,
    TRAKConfig,
    SourceConfig,
    MagicConfig,
    BM25Config,
    ProbeConfig,
)


def checkpoint_step(path: str | Path) -> int:
    """The global step of a Hugging Face `checkpoint-<step>` directory."""
    m = re.search(r"checkpoint-(\d+)$", str(Path(path).resolve()))
    if not m:
        raise UserError(f"{path} is not named checkpoint-<step>; give --checkpoint-lr and --checkpoint-steps instead")
    return int(m.group(1))


@command(app, *CONFIGS)
def attribute(
    out: Path = typer.Option(..., "--out", help="Where to write the scores (.safetensors: values, ids, method, measurement, config)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    configs: dict = None,
):
    """Attribute the queries to the training records with any method; writes a Scores file and
    its replayable configuration (`--config OUT.config.json`)."""
    from ..concepts.vector import resolve_measurement
    from ..data import load_records
    from ..methods import CONCEPT_METHODS, METHODS

    a = configs[AttributeConfig]
    if out.suffix != ".safetensors":
        raise UserError(f"--out must be a .safetensors file, got {out}")
    cls = METHODS[a.method]
    if a.stage and not (a.trajectory and a.method == "magic"):
        raise UserError("--stage names the recorded stage MAGIC replays: it goes with --method magic and --trajectory")
    concept_method = cls in CONCEPT_METHODS
    if concept_method:  # the concept is the query
        if a.queries or a.measurement not in ("default", "concept"):
            raise UserError(f"--method {a.method} scores the records against the concept (--probe); it takes no --queries or --measurement")
        measurement = resolve_measurement("concept", a.probe)
    else:
        if not a.queries:
            raise UserError("give the queries to attribute (--queries)")
        measurement = resolve_measurement(a.measurement, a.probe)
        load_records(a.queries)  # a bad query file fails before any gradient is computed
    method_config = configs[cls.config_class]
    train, model, task = _training_side(a)
    method = _method(a, cls, method_config, model, task).fit(train, progress=progress)
    if a.measurement == "concept-rate" and not concept_method:
        queries, measurement = _sampled(a, method, model, task, measurement)
    else:
        queries = None if concept_method else _with_responses(a, method, model, task)
    scores = method.score(queries, measurement, dtype=a.scores_dtype, by=a.by)
    if a.aggregate or a.measurement == "concept-rate":  # the rate is the mean over the samples
        scores = scores.mean_query()
    scores.save(out)
    save_configs(out, a, method_config)
    typer.echo(f"wrote {scores} to {out}")
    if check := scores.diagnostics.get("smoothness"):
        verdict = "passed" if check["passed"] else "failed (see the warning)"
        apart = f"retraining {check['finite_difference']:.4g} ({check['relative_error']:.1%} apart)"
        typer.echo(f"smoothness check {verdict}: metagradient {check['predicted']:.4g}, {apart}")
    if a.top_k:
        csv = out.with_suffix(".csv")
        scores.total().top_k(a.top_k, records=method.fitted().records).to_csv(csv, index=False)
        typer.echo(f"wrote the top {a.top_k} records per query to {csv}")


def _query_model(method, model, task):
    """The model and task the queries are run with: the ones given, or the index's."""
    index = method.fitted().index
    model = model if model is not None else (index.model() if index is not None else None)
    task = task if task is not None else (index.task() if index is not None else None)
    return model, task


def _sampled(a: AttributeConfig, method, model, task, concept):
    """(--samples responses sampled from the model for every query prompt, the concept's rate on
    them as the measurement)."""
    from ..concepts import concept_rate, sampled_responses
    from ..data import load_records

    model, task = _query_model(method, model, task)
    if model is None or getattr(task, "tokenizer", None) is None:
        raise UserError("--measurement concept-rate samples responses from the model: give --model (or an index built from one)")
    if a.samples < 1:
        raise UserError(f"--samples must be at least 1, got {a.samples}")
    prompts = [{"prompt": r["prompt"]} for r in load_records(a.queries) if r.get("prompt") is not None]
    if not prompts:
        raise UserError("--measurement concept-rate needs query records with a prompt")
    samples = sampled_responses(model, task.tokenizer, prompts, a.samples, max_new_tokens=a.max_new_tokens)
    return samples, concept_rate(model, task, concept, samples)


def _with_responses(a: AttributeConfig, method, model, task):
    """The query records, prompt-only ones completed by the model's greedy response (a concept
    is read on responses: teacher-forced on given ones, generated where none is given)."""
    from ..data import load_records
    from ..generate import with_responses

    records = load_records(a.queries)
    lacking = any(records[i].get("prompt") is not None and records[i].get("completion") is None for i in range(len(records)))
    if not lacking:
        return a.queries
    model, task = _query_model(method, model, task)
    tokenizer = getattr(task, "tokenizer", None)
    if model is None or tokenizer is None:
        raise UserError("queries without a completion need --model (its responses are generated) or completions in the file")
    return with_responses(records, model, tokenizer, a.max_new_tokens)


def _training_side(a: AttributeConfig):
    """(what `fit` takes, the model, its task) from --index or --model/--data."""
    from ..data import load_records
    from ..models import load_model
    from ..task import LanguageModelTask

    if a.index:
        indexes = [open_index(Path(p), a.model, a.device if a.model else None) for p in a.index]
        if len(indexes) > 1 and a.method != "tracin":
            raise UserError(f"several indexes are for --method tracin, not {a.method}")
        return (indexes if a.method == "tracin" else indexes[0]), None, None
    if not a.data:
        raise UserError("give the training records (--data) or an index (--index)")
    records = load_records(a.data)
    if a.method == "bm25":
        return records, None, None
    # the model attributed; TracIn and MAGIC can do without one (their task comes from their models)
    path = a.model or (a.checkpoint[-1] if a.method == "tracin" and a.checkpoint else None) or (a.init_model if a.method == "magic" else None)
    if a.method == "magic" and a.trajectory:
        path = a.model or a.init_model  # the architecture; the recorded stage's start gives the parameters
        if not path:
            raise UserError("MAGIC on a trajectory takes the architecture from a model of the run (--model)")
    if not path:
        raise UserError(
            "give the model to attribute (--model)" if a.method != "magic" else "MAGIC replays the training run from its initial model (--init-model)"
        )
    model, tokenizer = load_model(path, a.device, a.model_dtype)
    return records, model, LanguageModelTask(tokenizer)


def _method(a: AttributeConfig, cls, config, model, task):
    """The method object, with the extra models TracIn, TRAK, SOURCE and MAGIC need."""
    from ..models import load_model
    from ..task import LanguageModelTask

    load = lambda p: load_model(p, a.device, a.model_dtype)[0]
    if a.trajectory and a.method in ("tracin", "source"):
        return _from_trajectory(a, cls, config, model, task)
    if a.method == "tracin":
        return cls([load(c) for c in a.checkpoint] if a.checkpoint else None, task, config)
    if a.method == "trak":
        return cls(([model] if model is not None else []) + [load(p) for p in a.ensemble or []] or None, task, config)
    if a.method == "source":
        from ..methods.source import adam_scale_from_checkpoint, segments_from_config

        if not a.checkpoint:
            raise UserError("SOURCE needs the run's checkpoints (--checkpoint, repeatable)")
        steps = [checkpoint_step(c) for c in a.checkpoint] if config.trainer_state else None
        models = [load(c) for c in a.checkpoint]
        scales = {id(m): adam_scale_from_checkpoint(m, c) for m, c in zip(models, a.checkpoint)}  # where the optimizer state was saved
        segments = segments_from_config(models, config, steps)  # (sorted by step with --trainer-state)
        for seg in segments:
            seg.adam_scale = scales[id(seg.checkpoints[0])]
        return cls(segments, task, config, final_model=model)
    if a.method == "magic" and a.trajectory:
        return cls(model, task, config, trajectory=a.trajectory, stage=a.stage)
    if a.method == "magic":
        if not a.init_model:
            raise UserError("MAGIC replays the training run from its initial model (--init-model)")
        init, tokenizer = load_model(a.init_model, a.device, a.model_dtype)
        return cls(init, task if task is not None else LanguageModelTask(tokenizer), config)
    return cls(model, task, config)


def _from_trajectory(a: AttributeConfig, cls, config, model, task):
    """TracIn or SOURCE over a recorded run's stages: no hand-given learning rates or steps."""
    import dataclasses

    from ..methods.source import segments_from_trajectory
    from ..stages import Trajectory

    if model is None:
        raise UserError("give the model at the end of the run (--model) with --trajectory")
    traj = Trajectory(a.trajectory)
    if a.method == "source":
        return cls(segments_from_trajectory(traj, model), task, config, final_model=model)
    lrs = [traj.learning_rate_sum(s.name) for s in traj.stages]
    return cls([traj.checkpoint(s.name, model) for s in traj.stages], task, dataclasses.replace(config, checkpoint_lr=lrs))
