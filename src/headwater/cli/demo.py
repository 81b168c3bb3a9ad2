"""`headwater demo <name>`: the built-in end-to-end examples."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import typer

from ..demos import DEMOS
from ..errors import UserError
from .app import app
from .options import fail

# A demo trains its models for hundreds of float32 steps, which amplify round-off: with each CPU's
# fastest kernels the same seed gives models answering 46% to 76% of the facts demo's questions.
# These settings pick kernels whose arithmetic is the same on every x86-64 CPU: MKL's conditional
# numerical reproducibility on its SSE2 branch (the one Intel documents for non-Intel CPUs too),
# ATen's baseline kernels, and a fixed thread count (reductions split by thread). They are read
# when the libraries load, hence the re-exec; they cost about twice the time.
PORTABLE_KERNELS = {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}


def portable_environment(environ: dict[str, str]) -> dict[str, str]:
    """`environ` with the portable-kernel settings, marked so that the re-exec'd demo runs once."""
    return {**environ, **PORTABLE_KERNELS, "HEADWATER_PORTABLE_KERNELS": "1"}


@app.command()
def demo(
    name: str = typer.Argument("facts", help="Which demo: " + "; ".join(f"{k}: {v[1]}" for k, v in DEMOS.items())),
    workdir: Path = typer.Option(None, "--workdir", help="Where data, models, indexes and results go (default: headwater-demo/<name>)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the demo's data, training and projections."),
    retrain: bool = typer.Option(False, "--retrain", help="Train the demo's models again even if cached."),
    portable: bool = typer.Option(
        True,
        "--portable/--fast",
        help="Kernels with the same round-off on every x86-64 CPU and 2 threads, so a seed reproduces the README's figures; "
        "--fast uses each CPU's fastest kernels (about twice as fast; the trained models then differ between CPUs).",
    ),
):
    """Run a built-in end-to-end example (no downloads)."""
    if name not in DEMOS:
        fail(f"unknown demo {name!r}; choose one of {', '.join(DEMOS)}")
    if portable and os.environ.get("HEADWATER_PORTABLE_KERNELS") != "1":
        sys.stdout.flush()
        args = ["demo", name, "--seed", str(seed)] + (["--workdir", str(workdir)] if workdir else []) + (["--retrain"] if retrain else [])
        os.execve(sys.executable, [sys.executable, "-m", "headwater", *args], portable_environment(dict(os.environ)))
    if portable:
        import torch

        print(f"portable kernels: MKL_CBWR=COMPATIBLE, ATen {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")
    module = importlib.import_module(DEMOS[name][0])
    try:
        module.run(workdir or Path("headwater-demo") / name, seed=seed, retrain=retrain)
    except UserError as exc:
        fail(str(exc))
