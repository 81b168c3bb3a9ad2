"""How stage effects are estimated: `StageConfig`, the settings of `headwater stages`."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import H_BATCH, H_BATCH_LOSS, H_MEASUREMENT, H_MODULES, H_PROBE, H_SAMPLE_SEED, MEASUREMENTS, Config, CurvatureConfig, option
from ..errors import UserError


@dataclass
class StageConfig(Config):
    """How stage effects are estimated from a recorded trajectory."""

    batch_loss: str = option("token-mean", H_BATCH_LOSS, choices=("token-mean", "example-mean"))
    curvature: bool = option(
        True, "Also estimate with the later steps' curvature (needs the stages' records; ekfac: their records or fits given in Python)."
    )
    curvature_matrix: str = option(
        "gauss-newton",
        "The later steps' curvature: per step, at the run's parameters for that step, gauss-newton (positive semi-definite, robust "
        "when only stage boundaries are saved) or hessian (exact to first order for SGD-family runs recorded with a checkpoint "
        "every step); or, at scale, ekfac: one EK-FAC fit per later stage (on its records, at its start and end checkpoints), "
        "made exact on the span of the gaps entering the stage by a few Gauss–Newton products at its midpoint, and each stage "
        "crossed in its eigenbasis (SGD: elementwise, the cost of first-order propagation; Adam: one basis product per step), "
        "with no forward or backward pass per step.",
        choices=("gauss-newton", "hessian", "ekfac"),
    )
    ekfac: CurvatureConfig = option(CurvatureConfig(), "How each later stage's EK-FAC curvature is fitted (--curvature-matrix ekfac).")
    modules: list[str] | None = option(None, H_MODULES)  # the modules ekfac fits (the per-step products take the whole model)
    curvature_path: str = option(
        "interpolated",
        "Where the later steps' curvature is taken between saved parameters (ekfac's correction: at each stage's middle step): "
        "interpolated (by learning rate spent between the "
        "stage boundaries and any checkpoints) or replayed (each stage replayed from its start over its recorded batches, "
        "so every step's own parameters, and in Adam stages its own moments and their response to the gap, at one forward "
        "and backward pass per step and memory for every step's parameters; stages that cannot be replayed stay "
        "interpolated, and the result says which).",
        choices=("interpolated", "replayed"),
    )
    removed: float = option(
        1.0,
        "Fraction of each stage's updates taken out: 1 skips the stage; a small fraction asks how the behaviour responds "
        "to shrinking the stage, where first-order estimates are exact in the limit.",
    )
    readout: str = option(
        "both",
        "How a stage's estimated parameter gap e becomes an effect: evaluated (the measurement at the estimated counterfactual "
        "parameters θ_T − e), linear (∇f(θ_T)·e, first order), or both.",
        choices=("evaluated", "linear", "both"),
    )
    hvp_examples: int = option(
        64,
        "Records per curvature product when a step's batch was not recorded, and per stage for ekfac's correction (a seeded sample of the stage's).",
    )
    measurement: str = option("default", H_MEASUREMENT, choices=MEASUREMENTS)
    probe: str | None = option(None, H_PROBE)
    batch_size: int = option(8, H_BATCH)
    sample_seed: int = option(0, H_SAMPLE_SEED)

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.removed <= 1:
            raise UserError(f"--removed must be a fraction in (0, 1], got {self.removed}")
