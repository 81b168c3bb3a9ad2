"""`headwater probe train | sae`: make a concept (a direction at a layer) to attribute with."""

from __future__ import annotations

from pathlib import Path

import typer

from ..concepts.config import ProbeTrainConfig, SAEConceptConfig
from ..errors import UserError
from .app import app
from .options import command, save_configs

probe_app = typer.Typer(no_args_is_help=True, help="Make a concept: a probe direction trained on labelled texts, or an SAE feature.")
app.add_typer(probe_app, name="probe")


@command(probe_app, ProbeTrainConfig, name="train")
def train(
    out: Path = typer.Argument(..., help="Directory for the concept (concept.safetensors + concept.json)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    configs: dict = None,
):
    """Train a linear probe (or take the difference of class means) on activations averaged over
    response tokens, report its held-out accuracy, and save the direction in raw activation space."""
    from ..concepts import train_probe
    from ..data import load_records
    from ..models import load_model
    from ..task import LanguageModelTask

    c = configs[ProbeTrainConfig]
    for flag, value in (("--model", c.model), ("--positive", c.positive), ("--negative", c.negative)):
        if not value:
            raise UserError(f"give {flag}")
    positive, negative = load_records(c.positive), load_records(c.negative)
    model, tokenizer = load_model(c.model, c.device, c.model_dtype)
    task = LanguageModelTask(tokenizer)
    layer = int(c.layer) if c.layer.lstrip("-").isdigit() else c.layer
    concept = train_probe(
        model, task, positive, negative, layer, c.kind, c.test_fraction, c.split_seed, c.regularization, c.name, c.batch_size, progress
    )
    concept.save(out)
    save_configs(out / "probe", c)
    typer.echo(f"wrote {concept.describe()} to {out}")


@command(probe_app, SAEConceptConfig, name="sae")
def sae(out: Path = typer.Argument(..., help="Directory for the concept (concept.safetensors + concept.json)."), configs: dict = None):
    """Save an SAE feature as a concept at the model site its hook reads."""
    from ..concepts import sae_concept
    from ..models import load_model

    c = configs[SAEConceptConfig]
    for flag, value in (("--model", c.model), ("--sae", c.sae), ("--feature", c.feature)):
        if value is None:
            raise UserError(f"give {flag}")
    concept = sae_concept(c.sae, c.feature, load_model(c.model, c.device, c.model_dtype)[0], c.use)
    concept.save(out)
    save_configs(out / "sae", c)
    typer.echo(f"wrote {concept.describe()} to {out}")
