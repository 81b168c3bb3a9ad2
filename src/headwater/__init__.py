"""headwater: attribute a model's behaviour to its training data, stages, concepts and components.

    import headwater as hw
    index = hw.build_index("runs/idx", model, records, task=hw.LanguageModelTask(tokenizer))
    scores = hw.TrackStar().fit(index).score(queries)          # hw.Scores [records, queries]
    top = scores.top_k(20, records=index.records)             # a DataFrame

Every method is `Method(model, task, config).fit(train).score(queries, measurement=...)`.
"""

from .build import build_index
from .collect import GradientCollector, tracked_modules
from .concepts import ConceptVector, ProbeConfig, ProbeTrainConfig, load_sae, sae_concept, train_probe
from .config import (
    BuildConfig,
    CurvatureConfig,
    GradientConfig,
    InfluenceConfig,
    LDSConfig,
    MagicConfig,
    ProjectionConfig,
    SourceConfig,
    TracInConfig,
    TrackStarConfig,
    TrainConfig,
    TRAKConfig,
)
from .corpus import (
    BinsConfig,
    CorpusMap,
    Labels,
    UnlearnConfig,
    attach_labels,
    classify_records,
    contrast,
    corpus_map,
    labels_from_columns,
    labels_from_file,
    load_labels,
    unlearning_experiment,
)
from .curvature import Curvature, fit_curvature
from .errors import UserError
from .index import Index
from .measurement import Concept, Function, LogOdds, LogProb, Loss, Measurement, Prediction
from .methods import (
    BM25,
    EKFAC,
    KFAC,
    MAGIC,
    METHODS,
    SOURCE,
    TRAK,
    ActivationGradient,
    Cosine,
    Dot,
    InfluenceFunction,
    ProbeProjection,
    ProjectionDifference,
    TracIn,
    TrackStar,
)
from .methods.influence import dense_gauss_newton
from .methods.source import Segment, segments_from_trainer_state
from .metrics import lds, query_interval, retrieval_metrics, seed_ceiling
from .query import query
from .retrain import RetrainLM, leave_k_out, retrain_outcomes, subset_masks, tail_patch
from .scores import Scores
from .stages import StageAttribution, StageConfig, StageEffects, Trajectory, TrajectoryRecorder
from .store import ChecksumError, GradientStore
from .task import LanguageModelTask, ModuleTask, Task
from .training import Replay

__all__ = [
    "build_index",
    "BinsConfig",
    "CorpusMap",
    "Labels",
    "UnlearnConfig",
    "attach_labels",
    "classify_records",
    "contrast",
    "corpus_map",
    "labels_from_columns",
    "labels_from_file",
    "load_labels",
    "unlearning_experiment",
    "ConceptVector",
    "ProbeConfig",
    "ProbeTrainConfig",
    "load_sae",
    "sae_concept",
    "train_probe",
    "ActivationGradient",
    "ProbeProjection",
    "ProjectionDifference",
    "GradientCollector",
    "tracked_modules",
    "BuildConfig",
    "CurvatureConfig",
    "GradientConfig",
    "InfluenceConfig",
    "LDSConfig",
    "MagicConfig",
    "ProjectionConfig",
    "SourceConfig",
    "StageConfig",
    "StageAttribution",
    "StageEffects",
    "Trajectory",
    "TrajectoryRecorder",
    "TracInConfig",
    "TrackStarConfig",
    "TrainConfig",
    "TRAKConfig",
    "Curvature",
    "fit_curvature",
    "UserError",
    "Index",
    "Concept",
    "Function",
    "LogOdds",
    "LogProb",
    "Loss",
    "Measurement",
    "Prediction",
    "BM25",
    "EKFAC",
    "KFAC",
    "MAGIC",
    "METHODS",
    "SOURCE",
    "TRAK",
    "Cosine",
    "Dot",
    "InfluenceFunction",
    "TracIn",
    "TrackStar",
    "dense_gauss_newton",
    "Segment",
    "segments_from_trainer_state",
    "lds",
    "query_interval",
    "retrieval_metrics",
    "seed_ceiling",
    "query",
    "RetrainLM",
    "leave_k_out",
    "retrain_outcomes",
    "subset_masks",
    "tail_patch",
    "Scores",
    "ChecksumError",
    "GradientStore",
    "LanguageModelTask",
    "ModuleTask",
    "Task",
    "Replay",
]
__version__ = "0.2.0"
