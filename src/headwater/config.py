"""The configuration vocabulary: one typed dataclass per stage, each field with its help text.

Every command-line flag is generated from a field here (`cli/options.py`), so the flag, its help,
its choices and its default are the Python API's. A flag name means one thing: where two stages
share a flag (`--batch-size`, `--damping`, `--modules`) their fields carry the same help text, and
a test checks it. Every command saves its resolved configuration beside its output as JSON, and
`--config FILE` replays it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import UserError


def option(default: Any, help: str, *, flag: str | None = None, choices: tuple | None = None, cli: bool = True):
    """A config field: its default, its help text, its flag (default: --field-name) and choices."""
    meta = {"help": help, "flag": flag, "choices": choices, "cli": cli}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: _copy(default), metadata=meta)
    return field(default=default, metadata=meta)


def _copy(value):
    return dataclasses.replace(value) if dataclasses.is_dataclass(value) else type(value)(value)


class Config:
    """Shared behaviour of the stage configs: validation of choices, JSON round trips, replay."""

    def __post_init__(self):
        for f in fields(self):
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise UserError(f"{flag_of(f)}: {value!r} is not one of {', '.join(map(str, choices))}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        """Rebuild from `to_dict()` output; unknown keys are refused, nested configs rebuilt."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise UserError(f"unknown {cls.__name__} keys: {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for name, value in d.items():
            sub = nested_config(hints[name])
            kwargs[name] = sub.from_dict(value) if sub is not None and isinstance(value, dict) else value
        return cls(**kwargs)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Config:
        path = Path(path)
        if not path.exists():
            raise UserError(f"config file {path} does not exist")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except ValueError as exc:
            raise UserError(f"{path} is not a JSON config: {exc}") from None


def nested_config(hint) -> type[Config] | None:
    """The Config class a field's type names (also inside `X | None`), else None."""
    for t in (hint, *typing.get_args(hint)):
        if isinstance(t, type) and issubclass(t, Config):
            return t
    return None


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def default_of(f: dataclasses.Field):
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None


# ----------------------------------------------------------------------------- shared help texts
# Fields that several stages share use these texts, so that a flag means one thing everywhere.

H_MODEL = "The trained model whose behaviour is attributed: a local path or hub id of a causal LM (AutoModelForCausalLM)."
H_DATA = "Training records: a .jsonl/.csv/.parquet file, a save_to_disk directory, or a hub data set name."
H_INIT_MODEL = "The model the training run started from (MAGIC and retraining replay the run from it)."
H_BATCH = "Examples per forward/backward pass when computing gradients."
H_SAMPLE_SEED = "Seed of the random sample a method draws (TrackStar's training rows, the stage estimators' Hessian records)."
H_MODULES = (
    "Glob of module names to track (repeatable); default: every linear layer (Linear, Conv1D, Conv2d) with "
    "sides up to 16,384, the output head included (tied to the token embedding, with the lookup's share of the gradient)."
)
H_DAMPING = (
    "Damping, as a fraction of the mean eigenvalue of the matrix the method inverts "
    "(TrackStar: the gradient autocorrelation; ekfac/kfac: the curvature, by default 1, or 10 (30 on a sampled Fisher) with --cg-steps, see "
    "--damping-mode; trak: the feature kernel)."
)
H_POOL = "How a record's several rows (sentence or token units) combine into its score: max, mean or sum."
H_DEVICE = "Torch device to run the model on, e.g. cpu or cuda."
H_MODEL_DTYPE = (
    "Precision the model is loaded in: auto (the checkpoint's own), float32, bfloat16 or float16. On a GPU bfloat16 halves the "
    "model's memory and speeds up gradient collection (1.5x end to end on an H200, docs in the README); gradient rows are "
    "computed in float32 from its activations either way."
)
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
H_MOMENTUM = "Heavy-ball momentum of the optimizer (SGD)."
H_BATCH_LOSS = (
    "How the run reduced a batch's loss: token-mean (the Hugging Face Trainer: summed token losses over the "
    "batch's target tokens) or example-mean (each record's loss averaged over the batch)."
)
H_CHECKPOINT_LR = "Learning rate in effect at each checkpoint (repeatable, one per checkpoint): TracIn's weights, SOURCE's segments."
H_CHECKPOINT_STEPS = "Optimizer steps each checkpoint's segment covers (repeatable, one per checkpoint; SOURCE)."
H_MEASUREMENT = (
    "What the queries measure: loss, log-odds (classification margin / LM log p/(1-p)), log-prob, "
    "prediction (a regression output), concept (the direction given by --probe, averaged over the response tokens), "
    "concept-rate (attribute only: the concept's rate on --samples responses sampled from the model per query prompt, "
    "for a trait the model learned to write), or default (the method's own: the loss; TRAK: its output function)."
)
H_QUERIES = "Query records (same formats as --data): the behaviour to attribute."
H_METHOD = "Attribution method."
H_TOP_K = "Training records to report per query, best first (attribute: written beside the scores as .csv; 0: none)."
H_K = "How many top records the check uses, against as many random ones: removed (leave-k-out), or each stepped on alone per query (tail-patch)."
POOLS = ("max", "mean", "sum")
H_MAX_NEW = "Tokens the model generates per prompt when a response is needed (the projection difference; concept queries without responses)."
H_PROBE = (
    "A concept saved by `headwater probe` (a directory): what --measurement concept and the probe methods (probe, probe-diff, probe-grad) measure."
)
H_AGGREGATE = "Attribute the whole query set at once (the mean over queries)."
H_BY = (
    "What results are broken down by: attribute keeps the parts per tracked module or per checkpoint apart (module, checkpoint); "
    "bins groups records by label columns (repeat or comma-separate; two or more columns also give their joint bins)."
)
H_BOOTSTRAP = "Bootstrap replicates behind every interval."
H_BOOTSTRAP_SEED = "Seed of the bootstrap resampling."
H_CONFIDENCE = "Coverage of the reported intervals, e.g. 0.95."
MEASUREMENTS = ("default", "loss", "log-odds", "log-prob", "prediction", "concept", "concept-rate")


@dataclass
class ProjectionConfig(Config):
    """How gradients are compressed. `dim` is per tracked module (factored: k_out·k_in = dim)."""

    kind: str = option(
        "factored",
        "Gradient compression: factored (LoGra; the full gradient is never formed), dense (Gaussian) or none.",
        flag="--projection",
        choices=("factored", "dense", "none"),
    )
    dim: int = option(
        1024,
        "Projected dimensions per tracked module (factored: k_out·k_in). Fewer make every score noisier: token-row fact tracing "
        "recalled 0.88 of the documents at 256 against 0.93 at 1024 (docs/benchmarks.md).",
        flag="--projection-dim",
    )
    seed: int = option(0, "Seed of the random projections (an index and its queries must share it).", flag="--projection-seed")

    def __post_init__(self):
        super().__post_init__()
        if self.kind != "none" and self.dim < 1:
            raise UserError(f"--projection-dim must be positive, got {self.dim}")

    def factors(self) -> tuple[int, int]:
        """(k_out, k_in) with k_out·k_in = dim and k_out the largest divisor ≤ √dim."""
        k_out = max(d for d in range(1, math.isqrt(self.dim) + 1) if self.dim % d == 0)
        return k_out, self.dim // k_out

    def segment_dim(self, d_out: int, d_in_aug: int) -> int:
        """Width of one module's row segment."""
        return d_out * d_in_aug if self.kind == "none" else self.dim


@dataclass
class BuildConfig(Config):
    """Everything that determines an index; saved as `config.json` so a build can be replayed."""

    model: str | None = option(None, H_MODEL)
    data: str | None = option(None, H_DATA)
    projection: ProjectionConfig = option(ProjectionConfig(), "Gradient compression.")
    modules: list[str] | None = option(None, H_MODULES)
    storage_dtype: str = option(
        "auto",
        "Precision of the stored rows: auto (float16, or bfloat16 for optimizer-normalised rows, whose range overflows float16), "
        "float16, bfloat16 or float32.",
        choices=("auto", "float16", "bfloat16", "float32"),
    )
    batch_size: int = option(8, H_BATCH)
    max_length: int | None = option(None, "Truncate examples to this many tokens (default: the tokenizer's limit).")
    format: str = option(
        "auto",
        "Record format: auto (by the columns present), text, prompt_completion or messages.",
        choices=("auto", "text", "prompt_completion", "messages"),
    )
    unit: str = option(
        "document",
        "Attribution unit, one stored row each: document, sentence, or token (every predicted token).",
        choices=("document", "sentence", "token"),
    )
    optimizer_state: str | None = option(
        None,
        "Optimizer state (torch.save'd state_dict, safetensors, or a Hugging Face checkpoint folder): divide gradients by "
        "√(second moment), each parameter's floored at 1e-3 of its mean.",
    )
    shard_rows: int | None = option(None, "Rows per shard (default: about 128 MiB per shard).")
    device: str = option("cpu", H_DEVICE)
    model_dtype: str = option("auto", H_MODEL_DTYPE, choices=MODEL_DTYPES)

    def __post_init__(self):
        super().__post_init__()
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")

    @property
    def row_dtype(self) -> str:
        """The stored rows' precision, with `auto` resolved: dividing by √v (v ~ 1e-10 for rarely
        updated weights) takes rows past float16's 65504, so normalised rows get bfloat16's range."""
        if self.storage_dtype != "auto":
            return self.storage_dtype
        return "bfloat16" if self.optimizer_state else "float16"


@dataclass
class CurvatureConfig(Config):
    """How KFAC / EK-FAC factors are fitted."""

    fisher: str = option(
        None,
        "Fisher for the curvature: true (one label per target sampled from the model), exact (the expectation over every class: "
        "classifiers with up to 64 classes, a backward pass per class) or empirical (the data's labels). Default: true; exact "
        "for CG refinement of a classifier.",
        choices=("true", "exact", "empirical"),
    )
    max_examples: int | None = option(None, "Fit the curvature on a random sample of this many examples (default: all).", flag="--curvature-examples")
    batch_size: int = option(8, H_BATCH)
    seed: int = option(0, "Seed of the labels sampled for the true Fisher and of the example sample.", flag="--fisher-seed")
    dense_conv_blocks: int | None = option(
        None,
        "EK-FAC: convolutions of at most this many parameters keep their whole Fisher block (P² memory) instead of its diagonal "
        "in the Kronecker eigenbasis, which fits them poorly (benchmarks/ekfac_blocks.py). 0: none. Default: 4096 (128 MiB). "
        "SOURCE keeps the Kronecker blocks (docs/benchmarks.md).",
    )
    dense_fisher: str | None = option(
        None,
        "Fisher of those whole blocks: true, exact or empirical as --fisher. Default: --fisher, except exact in place of true for a "
        "classifier of up to 64 classes (one sampled label per example estimates a block's P² entries with rank at most the number of examples).",
        choices=("true", "exact", "empirical"),
    )


@dataclass
class GradientConfig(Config):
    """Gradient dot product / cosine: the settings used when no index supplies the rows."""

    projection: ProjectionConfig = option(ProjectionConfig(), "Gradient compression (without an index).")
    modules: list[str] | None = option(None, H_MODULES)
    batch_size: int = option(8, H_BATCH)
    pool: str = option("max", H_POOL, choices=POOLS)


@dataclass
class TrackStarConfig(GradientConfig):
    """TrackStar: cosine after the damped inverse square root of the gradient autocorrelation."""

    mix: str = option(
        "auto",
        "Weight of the queries' autocorrelation in TrackStar's R: auto (eigenvalue matching), "
        "or a number in [0, 1] (0: training rows alone, fitted once per index).",
    )
    # 1.0, not 0.1: higher LDS on 3 of 4 tasks and higher fact-tracing recall (benchmarks/damping.py, docs/benchmarks.md)
    damping: float = option(1.0, H_DAMPING)
    fit_rows: int = option(8192, "Training rows sampled to fit TrackStar's autocorrelation.")
    mix_rank: int = option(1000, "Eigenvalue index at which TrackStar's automatic mixing matches the two autocorrelations.")
    sample_seed: int = option(0, H_SAMPLE_SEED)

    def mix_weight(self) -> float | str:
        if self.mix == "auto":
            return "auto"
        try:
            lam = float(self.mix)
        except ValueError:
            raise UserError(f"--mix must be 'auto' or a number in [0, 1], got {self.mix!r}") from None
        if not 0 <= lam <= 1:
            raise UserError(f"--mix must be in [0, 1], got {lam}")
        return lam

    def __post_init__(self):
        super().__post_init__()
        self.mix = str(self.mix)
        self.mix_weight()


@dataclass
class TracInConfig(GradientConfig):
    """TracIn over checkpoints: Σ_c η_c g_c(z)·g_c(q)."""

    checkpoint_lr: list[float] | None = option(None, H_CHECKPOINT_LR)


@dataclass
class InfluenceConfig(Config):
    """Influence functions: ∇f(q)ᵀ (G + λI)⁻¹ ∇L(z) with G the KFAC / EK-FAC curvature."""

    curvature: CurvatureConfig = option(CurvatureConfig(), "How the curvature is fitted.")
    # None: 1 × each module's mean eigenvalue for EK-FAC/KFAC alone (the literature's 0.1 scores lower
    # on 3 of the 4 tasks of benchmarks/lds.py); with CG, the whole model's × 10 on a classifier's exact
    # Fisher, × 30 on a sampled one, whose noise CG would otherwise fit (benchmarks/cg_check.py)
    damping: float | None = option(None, H_DAMPING)
    damping_mode: str | None = option(
        None,
        "Whether --damping is a fraction of each module's mean eigenvalue (relative), of the mean eigenvalue over all modules "
        "(model: one λ, as an exact solve has) or absolute.",
        choices=("relative", "model", "absolute"),
    )
    cg_steps: int = option(
        0,
        "Refine the inverse-curvature-vector product by this many preconditioned conjugate-gradient steps on the Fisher of the "
        "curvature's sample, each one pass over that sample; unless given, --damping is then 10 (30 on a sampled Fisher) and --damping-mode model "
        "(without CG: 1 and relative).",
    )
    query_rank: int | None = option(
        None, "Compress each preconditioned query gradient to this rank per module before scoring (saves memory and time for many queries)."
    )
    modules: list[str] | None = option(None, H_MODULES)
    batch_size: int = option(8, H_BATCH)
    pool: str = option("max", H_POOL, choices=POOLS)

    def solve_damping(self, fisher: str | None = None) -> tuple[float, str]:
        """(damping, mode) of the system (G + λI)x = ∇f solved, defaults filled in (under CG by `fisher`)."""
        cg = self.cg_steps > 0
        mode = self.damping_mode or ("model" if cg else "relative")
        if self.damping is None and mode == "absolute":
            raise UserError("--damping-mode absolute needs a --damping (an absolute λ has no default)")
        return (self.damping if self.damping is not None else ((10.0 if fisher == "exact" else 30.0) if cg else 1.0)), mode

    def solve_curvature(self, task) -> CurvatureConfig:
        """The curvature's settings, defaults filled in: the true Fisher by one sampled label per
        target, except under CG for a ModuleTask classifier, whose exact expectation over the
        classes CG converges to a better solve with (one sample per example is a noisy estimate
        of a confident classifier's Fisher; benchmarks/cg.py)."""
        from .task import is_classifier

        if self.curvature.fisher is not None:
            return self.curvature
        exact = self.cg_steps > 0 and is_classifier(task)
        return dataclasses.replace(self.curvature, fisher="exact" if exact else "true")


@dataclass
class TRAKConfig(Config):
    """TRAK: a kernel of projected output gradients, averaged over an ensemble of models."""

    projection: ProjectionConfig = option(ProjectionConfig(), "Projection of the output gradients.")
    damping: float = option(3.0, H_DAMPING)  # benchmarks/damping.py: the best of 0.03-10 on 7 of 8 task × ensemble cells
    output: str = option(
        "auto",
        "TRAK's output function on the training records: log-odds (classification margin / LM log p/(1-p)), "
        "prediction (a regression model's output), loss, or auto (prediction for mse, else log-odds).",
        choices=("auto", "log-odds", "prediction", "loss"),
    )
    modules: list[str] | None = option(None, H_MODULES)
    batch_size: int = option(8, H_BATCH)


@dataclass
class SourceConfig(Config):
    """SOURCE: influence propagated along a run split into segments, one checkpoint each."""

    curvature: CurvatureConfig = option(CurvatureConfig(), "How each segment's curvature is fitted.")
    checkpoint_lr: list[float] | None = option(None, H_CHECKPOINT_LR)
    checkpoint_steps: list[int] | None = option(None, H_CHECKPOINT_STEPS)
    trainer_state: str | None = option(None, "A Hugging Face trainer_state.json giving each checkpoint segment's learning rates and steps (SOURCE).")
    momentum: float = option(0.0, H_MOMENTUM)
    modules: list[str] | None = option(None, H_MODULES)
    batch_size: int = option(8, H_BATCH)

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.momentum < 1:
            raise UserError(f"--momentum must be in [0, 1), got {self.momentum}")


@dataclass
class BM25Config(Config):
    """BM25 has no settings of its own: it ranks records by the words they share with a query."""


@dataclass
class TrainConfig(Config):
    """A deterministic training recipe, replayed by `training.Replay` (MAGIC, retraining, the demos).

    SGD uses heavy-ball or Nesterov momentum and coupled weight decay (as torch.optim.SGD); AdamW decoupled
    decay and bias correction (as torch.optim.AdamW). The loss of a step is the mean over its
    examples of each example's loss.
    """

    optimizer: str = option("adamw", "Optimizer of the training run: sgd or adamw.", choices=("sgd", "adamw"))
    lr: float = option(1e-3, "Peak learning rate of the training run.")
    schedule: str = option(
        "constant", "Learning-rate schedule after warm-up: constant, linear (to 0) or cosine (to 0).", choices=("constant", "linear", "cosine")
    )
    warmup: float = option(0.0, "Fraction of the run's steps spent warming the learning rate up linearly from 0.")
    epochs: int = option(1, "Epochs of the training run.")
    train_batch_size: int = option(8, "Examples per optimizer step of the training run.")
    momentum: float = option(0.0, H_MOMENTUM)
    nesterov: bool = option(False, "Nesterov momentum (SGD with momentum, as torch.optim.SGD(nesterov=True)).")
    beta1: float = option(0.9, "AdamW's first-moment decay.")
    beta2: float = option(0.999, "AdamW's second-moment decay.")
    adam_eps: float = option(1e-8, "AdamW's epsilon.")
    weight_decay: float = option(0.0, "Weight decay (SGD: coupled L2; AdamW: decoupled).")
    clip_norm: float | None = option(None, "Clip the global gradient norm of each step to this value.")
    data_seed: int = option(0, "Seed of the training run's data order.")
    drop_last: bool = option(False, "Drop each epoch's last incomplete batch.")
    lr_per_step: list[float] | None = option(None, "Explicit learning rate of every step (overrides lr, schedule and warmup).", cli=False)

    def __post_init__(self):
        super().__post_init__()
        if self.train_batch_size < 1 or self.epochs < 1:
            raise UserError("--train-batch-size and --epochs must be at least 1")
        if not 0 <= self.warmup < 1:
            raise UserError(f"--warmup must be a fraction in [0, 1), got {self.warmup}")
        if self.nesterov and (self.optimizer != "sgd" or not self.momentum):
            raise UserError("--nesterov needs SGD with momentum (--optimizer sgd --momentum > 0)")


@dataclass
class MagicConfig(Config):
    """MAGIC: exact metagradients through a replayed training run."""

    run: TrainConfig = option(TrainConfig(), "The training recipe MAGIC replays.")
    replay_seeds: list[int] | None = option(
        None, "Data-order seeds of the replayed runs whose metagradients are averaged (default: the run's own --data-seed)."
    )
    checkpoint_every: int | None = option(None, "Keep the training state every this many steps for the reverse pass (default: √steps).")
    smoothness_check: float = option(
        0.01,
        "Step ε of MAGIC's check of itself: the metagradient against a finite difference along a random ε-reweighting of "
        "the records (one more training run; 0 skips it). The scores keep the result; MAGIC warns when the two disagree by over 10%.",
    )
    # a recorded stage's reduction (default token-mean); MAGIC's own replays of `run` average examples
    batch_loss: str | None = option(None, H_BATCH_LOSS, choices=("token-mean", "example-mean"))


@dataclass
class RetrainConfig(Config):
    """How counterfactual ground truth is obtained: retraining on subsets of the training records."""

    train: str = option(
        "builtin",
        "How to retrain: builtin (replay the training recipe from --init-model on the kept --data records and "
        "measure the --queries' losses), or module:function taking (mask: bool array over the training records, seed: int) "
        "and returning the queries' measurement values.",
    )
    init_model: str | None = option(None, H_INIT_MODEL)
    data: str | None = option(None, H_DATA)
    queries: str | None = option(None, H_QUERIES)
    retrain_seeds: int = option(2, "Training seeds per retraining (≥ 2 also gives LDS's seed-noise ceiling).")
    processes: int = option(1, "Retraining processes.")


@dataclass
class LDSConfig(Config):
    """The linear datamodeling score's subsets."""

    subsets: int = option(50, "Random training subsets to retrain on (m).")
    alpha: float = option(0.5, "Fraction of the training records in each subset.")
    subset_seed: int = option(0, "Seed of the subset draw.")

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.alpha < 1:
            raise UserError(f"--alpha must be in (0, 1), got {self.alpha}")


METHOD_NAMES = ("dot", "cosine", "trackstar", "tracin", "ekfac", "kfac", "trak", "source", "magic", "bm25", "probe", "probe-diff", "probe-grad")


@dataclass
class AttributeConfig(Config):
    """What `headwater attribute` runs: a method on training data (or indexes) for queries."""

    method: str = option("cosine", H_METHOD, choices=METHOD_NAMES)
    queries: str | None = option(None, H_QUERIES)
    measurement: str = option("default", H_MEASUREMENT, choices=MEASUREMENTS)
    index: list[str] | None = option(
        None, "Index directory to use as the gradient cache and source of records and model (repeatable: one per checkpoint for TracIn)."
    )
    model: str | None = option(None, H_MODEL)
    data: str | None = option(None, H_DATA)
    checkpoint: list[str] | None = option(
        None,
        "A checkpoint of the training run, in training order (repeatable; TracIn and SOURCE). "
        "SOURCE reads Adam's second moments from an optimizer state saved in the folder (the HF Trainer's optimizer.pt).",
    )
    ensemble: list[str] | None = option(None, "A further independently trained model (repeatable; TRAK's ensemble).")
    init_model: str | None = option(None, H_INIT_MODEL)
    trajectory: str | None = option(
        None,
        "A run recorded by TrajectoryRecorder: its stage-end checkpoints, learning rates and steps (TracIn, SOURCE), or the "
        "stage MAGIC replays exactly as it ran (--stage; --data holds that stage's records).",
    )
    stage: str | None = option(None, "With --trajectory and --method magic: the recorded stage to replay (default: the last).")
    device: str = option("cpu", H_DEVICE)
    model_dtype: str = option("auto", H_MODEL_DTYPE, choices=MODEL_DTYPES)
    scores_dtype: str = option("float32", "Precision of the written scores: float32 or float64.", choices=("float32", "float64"))
    by: str | None = option(None, H_BY, choices=("module", "checkpoint"))
    top_k: int = option(0, H_TOP_K)
    probe: str | None = option(None, H_PROBE)
    max_new_tokens: int = option(32, H_MAX_NEW)
    aggregate: bool = option(False, H_AGGREGATE)
    samples: int = option(32, "Responses sampled from the model per query prompt for --measurement concept-rate (their mean is one query).")


QUERY_METHODS = ("dot", "cosine", "trackstar", "tracin", "ekfac", "kfac", "trak", "bm25")


@dataclass
class QueryConfig(Config):
    """What `headwater query` ranks: the top training records of an index for the queries."""

    queries: str | None = option(None, H_QUERIES)
    method: str = option("cosine", H_METHOD, choices=QUERY_METHODS)
    measurement: str = option("default", H_MEASUREMENT, choices=MEASUREMENTS)
    probe: str | None = option(None, H_PROBE)
    top_k: int = option(10, H_TOP_K)
    bottom_k: int = option(0, "Also keep the most opposing records per query.")
    rows: bool = option(False, "Rank the stored rows (sentences, tokens) themselves instead of pooling them per record.")
    aggregate: bool = option(False, H_AGGREGATE)
