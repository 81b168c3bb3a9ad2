"""Methods that need more than one stored gradient per example, run from model paths and data files:
TRAK (an ensemble of models), SOURCE (a run's checkpoints) and MAGIC (a replayable training run).

Each returns a dense score matrix [n_train, q] in the library's sign convention; the CLI's
`headwater attribute` wraps `attribute()`.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .build import load_model
from .data import load_records
from .errors import UserError
from .methods.magic import TrainingRun, magic_scores
from .methods.source import Segment, segments_from_trainer_state, source_scores
from .methods.trak import trak_scores
from .projection import ProjectionConfig
from .task import LanguageModelTask

METHODS = ("trak", "source", "magic")


def checkpoint_step(path: str | Path) -> int:
    """The global step of a Hugging Face `checkpoint-<step>` directory."""
    m = re.search(r"checkpoint-(\d+)$", str(Path(path).resolve()))
    if not m:
        raise UserError(f"{path} is not named checkpoint-<step>; give --lr and --steps for each checkpoint instead")
    return int(m.group(1))


def attribute(
    method: str,
    model: str,
    data: str,
    queries: str,
    device: str = "cpu",
    batch_size: int = 8,
    projection_dim: int = 1024,
    seed: int = 0,
    ensemble: list[str] | None = None,
    damping: float | None = None,
    checkpoints: list[str] | None = None,
    trainer_state: str | None = None,
    lrs: list[float] | None = None,
    steps: list[int] | None = None,
    momentum: float = 0.0,
    run: TrainingRun | None = None,
    per_query: bool = True,
) -> np.ndarray:
    """Scores [n_train, q] of `method` for a causal LM at `model` (for MAGIC: the run's initial model).

    - trak: `ensemble` lists further independently trained models; `damping` is TRAK's ridge.
    - source: `checkpoints` of the run in order, with `trainer_state` (a Hugging Face
      `trainer_state.json`, steps read from the `checkpoint-<step>` names) or explicit `lrs`/`steps`;
      `model` is the final model.
    - magic: `run` is the training recipe replayed from `model`; with `per_query=False` the mean
      query loss is differentiated once and the matrix has one column.
    """
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    final, tokenizer = load_model(model, device)
    task = LanguageModelTask(tokenizer)
    train, query = load_records(data), load_records(queries)
    if method == "trak":
        models = [final] + [load_model(p, device)[0] for p in ensemble or []]
        return trak_scores(models, task, train, query, ProjectionConfig("factored", projection_dim, seed),
                           damping=1.0 if damping is None else damping, batch_size=batch_size)
    if method == "source":
        if not checkpoints:
            raise UserError("SOURCE needs the run's checkpoints (--checkpoint, repeatable)")
        loaded = [load_model(p, device)[0] for p in checkpoints]
        if trainer_state:
            segments = segments_from_trainer_state(trainer_state, {checkpoint_step(p): m for p, m in zip(checkpoints, loaded)})
        else:
            if not lrs or not steps or len(lrs) != len(loaded) or len(steps) != len(loaded):
                raise UserError("SOURCE needs --trainer-state, or one --lr and one --steps per --checkpoint")
            segments = [Segment([m], lr, k) for m, lr, k in zip(loaded, lrs, steps)]
        return source_scores(final, task, train, query, segments, momentum=momentum, batch_size=batch_size)
    if run is None:
        raise UserError("MAGIC needs the training recipe to replay (optimizer, learning rate, epochs, batch size)")
    examples = [task.collate(task.encode(q)) for q in query]
    if not per_query:
        mean_loss = lambda m: sum(task.per_example_loss(m, b).sum() for b in examples) / len(examples)
        return magic_scores(final, task, train, run, mean_loss)[:, None]
    cols = [magic_scores(final, task, train, run, lambda m, b=b: task.per_example_loss(m, b).sum()) for b in examples]
    return np.stack(cols, 1)
