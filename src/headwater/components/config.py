"""Settings of `headwater components`."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import H_DEVICE, H_MODEL, H_MODEL_DTYPE, H_PROBE, MODEL_DTYPES, Config, option
from ..errors import UserError


@dataclass
class ComponentConfig(Config):
    """Which behaviour is attributed to which components, how, and how it is checked."""

    model: str | None = option(None, H_MODEL)
    clean: str | None = option(None, "Clean prompts (records with prompt and answer: the answer the behaviour gives).")
    corrupt: str | None = option(None, "Corrupt prompts, one per clean prompt and of the same token length (answer: the alternative).")
    metric: str = option(
        "logit-diff",
        "What the pairs measure: logit-diff (clean answer − corrupt answer at the last prompt token) or concept "
        "(the --probe concept averaged over the prompt).",
        choices=("logit-diff", "concept"),
    )
    probe: str | None = option(None, H_PROBE)
    patching: str = option(
        "gradient",
        "gradient (attribution patching: the gradient on the corrupt run) or integrated (the gradient averaged along "
        "inputs interpolated from corrupt to clean).",
        choices=("gradient", "integrated"),
    )
    steps: int = option(8, "Interpolation steps of --patching integrated.")
    kinds: list[str] = option(["head", "mlp"], "Components to attribute (repeatable): head, mlp, neuron.")
    verify: int = option(10, "Check the top this-many components by exact activation patching (0: none).")
    edges: bool = option(False, "Also score the edges between components (edge attribution patching).")
    device: str = option("cpu", H_DEVICE)
    model_dtype: str = option("auto", H_MODEL_DTYPE, choices=MODEL_DTYPES)

    def __post_init__(self):
        super().__post_init__()
        bad = [k for k in self.kinds if k not in ("head", "mlp", "neuron")]
        if bad:
            raise UserError(f"--kinds: {bad[0]!r} is not one of head, mlp, neuron")
        if self.steps < 1 or self.verify < 0:
            raise UserError("--steps must be at least 1 and --verify at least 0")
