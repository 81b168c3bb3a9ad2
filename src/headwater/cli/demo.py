"""`headwater demo <name>`: the built-in end-to-end examples."""

from __future__ import annotations

import importlib
from pathlib import Path

import typer

from ..demos import DEMOS, run_with_portable_kernels
from ..errors import UserError
from .app import app
from .options import fail


@app.command()
def demo(
    name: str = typer.Argument("facts", help="Which demo: " + "; ".join(f"{k}: {v[1]}" for k, v in DEMOS.items())),
    workdir: Path = typer.Option(None, "--workdir", help="Where data, models, indexes and results go (default: headwater-demo/<name>)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the demo's data, training and projections."),
    retrain: bool = typer.Option(False, "--retrain", help="Train the demo's models again even if cached."),
    portable: bool = typer.Option(
        True,
        "--portable/--native-kernels",
        help="Kernels whose round-off does not depend on the x86-64 CPU, and 2 threads, so a seed reproduces the README's figures; "
        "--native-kernels uses the CPU's own (about twice as fast; the trained models then differ between CPUs).",
    ),
):
    """Run a built-in end-to-end example (no downloads)."""
    if name not in DEMOS:
        fail(f"unknown demo {name!r}; choose one of {', '.join(DEMOS)}")
    if portable:
        # the arguments are rebuilt from the parameters, not sys.argv, so that a call through
        # `app([...])` runs the same demo; a new option of this command must be added here
        args = ["demo", name, "--seed", str(seed)] + (["--workdir", str(workdir)] if workdir else []) + (["--retrain"] if retrain else [])
        code = run_with_portable_kernels(["-m", "headwater", *args])
        if code is not None:
            raise typer.Exit(code)
    module = importlib.import_module(DEMOS[name][0])
    try:
        module.run(workdir or Path("headwater-demo") / name, seed=seed, retrain=retrain)
    except UserError as exc:
        fail(str(exc))
