"""Settings of concept making (`headwater probe`) and of the fast probe methods."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import H_BATCH, H_DEVICE, H_MAX_NEW, H_MODEL, H_MODEL_DTYPE, MODEL_DTYPES, Config, option
from ..errors import UserError

H_LAYER = "Where the concept lives: a block number (the residual stream after that block) or a module name (its output)."


@dataclass
class ProbeTrainConfig(Config):
    """How `headwater probe train` finds a concept direction from labelled texts."""

    model: str | None = option(None, H_MODEL)
    positive: str | None = option(
        None, "Records that show the concept (same formats as --data); activations are averaged over their response tokens."
    )
    negative: str | None = option(None, "Records that do not show it.")
    layer: str = option("-1", H_LAYER)
    kind: str = option(
        "logistic",
        "logistic (scikit-learn logistic regression on standardised activations, folded back to raw space) "
        "or mean-diff (difference of the class means).",
        choices=("logistic", "mean-diff"),
    )
    test_fraction: float = option(0.25, "Share of the labelled records held out to report the probe's accuracy.")
    regularization: float = option(1.0, "Inverse L2 strength C of the logistic regression.")
    split_seed: int = option(0, "Seed of the probe's held-out split.")
    name: str = option("concept", "Name of the concept (shown in results).")
    batch_size: int = option(16, H_BATCH)
    device: str = option("cpu", H_DEVICE)
    model_dtype: str = option("auto", H_MODEL_DTYPE, choices=MODEL_DTYPES)

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.test_fraction < 1:
            raise UserError(f"--test-fraction must be in (0, 1), got {self.test_fraction}")


@dataclass
class ProbeConfig(Config):
    """The fast probe approximations of Concept Influence (forward passes, or a backward to the layer)."""

    batch_size: int = option(16, H_BATCH)
    max_new_tokens: int = option(32, H_MAX_NEW)
    generations: str | None = option(None, "JSON file caching the model's own responses by prompt (probe-diff); reused while the model is unchanged.")


@dataclass
class SAEConceptConfig(Config):
    """Which SAE feature `headwater probe sae` saves as a concept, and how it is read."""

    model: str | None = option(None, H_MODEL)
    sae: str | None = option(None, "A SAELens folder: cfg.json and sae_weights.safetensors (flat or metadata layouts).")
    feature: int | None = option(None, "The SAE feature's index.")
    use: str = option(
        "encoder",
        "The feature's encoder pre-activation (encoder) or its decoder direction (decoder); "
        "never its gated output, whose gradient is zero where it is off.",
        choices=("encoder", "decoder"),
    )
    device: str = option("cpu", H_DEVICE)
    model_dtype: str = option("auto", H_MODEL_DTYPE, choices=MODEL_DTYPES)
