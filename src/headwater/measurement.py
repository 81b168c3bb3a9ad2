"""Measurements: what a query asks about, separate from the training loss.

A measurement maps (task, model, batch of query examples) to one value per example, and declares
the direction in which it counts as *more* of the behaviour: "down" for losses, "up" for outputs,
log-probabilities and concepts.

**Sign convention of the whole library.** A positive score means that a gradient step on the
training example moves the measurement in its declared direction (lowers a loss, raises an output
or a concept). Every method works with the measurement's *objective*, the measurement turned into
something to lower (f for "down", −f for "up"): a training example helps when its loss gradient
points along the objective's gradient, so scores are (preconditioned) dot products of the two.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch

from .architecture import Site, capture, target_mean
from .errors import UserError
from .task import Batch, ModuleTask, Task


@runtime_checkable
class Measurement(Protocol):
    name: str
    direction: Literal["down", "up"]

    def __call__(self, task: Task, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """One value per query example, [B]."""

    def describe(self) -> dict:
        """JSON-able description, saved with the scores."""


def objective(measurement: Measurement, task: Task, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The measurement as something to lower, [B]: f for "down", −f for "up"."""
    values = measurement(task, model, batch)
    return values if measurement.direction == "down" else -values


def objective_fn(measurement: Measurement, task: Task) -> Callable[[torch.nn.Module, Batch], torch.Tensor]:
    """`objective` bound to a measurement and task: a per-example loss function for collectors."""
    return lambda model, batch: objective(measurement, task, model, batch)


@dataclass(frozen=True)
class Loss:
    """The query example's own training loss (the default measurement)."""

    name: str = "loss"
    direction: Literal["down", "up"] = "down"

    def __call__(self, task, model, batch):
        return task.loss(model, batch)

    def describe(self) -> dict:
        return {"name": self.name, "direction": self.direction}


@dataclass(frozen=True)
class LogOdds:
    """log p/(1−p) of the query's target: the classification margin, or an LM completion's log-odds
    (TRAK's output function)."""

    name: str = "log-odds"
    direction: Literal["down", "up"] = "up"

    def __call__(self, task, model, batch):
        return task.log_odds(model, batch)

    def describe(self) -> dict:
        return {"name": self.name, "direction": self.direction}


@dataclass(frozen=True)
class LogProb:
    """log p of the query's target (an LM completion's log-probability; a class's log-probability).
    Its gradient is the loss's, negated, so it ranks training data exactly as `Loss` does."""

    name: str = "log-prob"
    direction: Literal["down", "up"] = "up"

    def __call__(self, task, model, batch):
        return -task.loss(model, batch)

    def describe(self) -> dict:
        return {"name": self.name, "direction": self.direction}


@dataclass(frozen=True)
class Prediction:
    """The model's scalar output on the query (regression with a `ModuleTask`)."""

    name: str = "prediction"
    direction: Literal["down", "up"] = "up"

    def __call__(self, task, model, batch):
        if not isinstance(task, ModuleTask):
            raise UserError("the prediction measurement is for a ModuleTask's scalar output")
        out = task.outputs(model, batch)
        if out.reshape(len(out), -1).shape[1] != 1:
            raise UserError(f"the prediction measurement needs one output per example, the model gives {tuple(out.shape[1:])}")
        return out.reshape(-1)

    def describe(self) -> dict:
        return {"name": self.name, "direction": self.direction}


@dataclass(frozen=True)
class Function:
    """Any callable `fn(model, batch) -> Tensor[B]`, with the direction that counts as more."""

    fn: Callable[[torch.nn.Module, Batch], torch.Tensor]
    direction: Literal["down", "up"] = "up"
    name: str = "function"

    def __post_init__(self):
        if self.direction not in ("down", "up"):
            raise UserError(f"a measurement's direction is 'down' or 'up', got {self.direction!r}")

    def __call__(self, task, model, batch):
        return self.fn(model, batch)

    def describe(self) -> dict:
        return {"name": self.name, "direction": self.direction, "function": getattr(self.fn, "__qualname__", "callable")}


@dataclass(frozen=True)
class Concept:
    """A direction v [d] read at a site (the output, or input, of module `module`):
    vᵀh + bias averaged over the query's target positions (a language model's response tokens;
    the one output of other models). Probe directions, SAE features and steering vectors are all
    concepts (`headwater.concepts` makes them; `ConceptVector.measurement()` gives this)."""

    vector: torch.Tensor = field(repr=False)
    module: str
    read: str = "output"
    bias: float = 0.0
    name: str = "concept"
    direction: Literal["down", "up"] = "up"

    def __call__(self, task, model, batch):
        with capture(model, Site(self.module, self.read)) as seen:
            task.loss(model, batch)  # runs the forward pass the hook reads
        return self.pooled(seen[-1], batch.get("target_mask"))

    def pooled(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """vᵀh + bias of activations h [B, T, d] (or [B, d]) averaged over `mask` [B, T], [B]."""
        if h.shape[-1] != self.vector.numel():
            raise UserError(f"the concept has {self.vector.numel()} dims, the activations at {self.module} ({self.read}) have {h.shape[-1]}")
        return target_mean(h, mask) @ self.vector.to(h) + self.bias

    def describe(self) -> dict:
        return {"name": self.name, "direction": self.direction, "module": self.module, "read": self.read, "dim": int(self.vector.numel())}


BUILTIN = {"loss": Loss, "log-odds": LogOdds, "log-prob": LogProb, "prediction": Prediction}


def measurement_named(name: str) -> Measurement:
    """A built-in measurement by name (loss, log-odds, log-prob, prediction)."""
    if name not in BUILTIN:
        raise UserError(f"unknown measurement {name!r}; choose one of {', '.join(BUILTIN)}")
    return BUILTIN[name]()
