"""headwater: attribute a model's behaviour to its training data, stages and concepts.

    import headwater as hw
    index = hw.build_index("runs/idx", model, records, task=hw.LanguageModelTask(tokenizer))
    top = index.query(queries, method="trackstar", top_k=20)
"""

from .build import BuildConfig, build_index
from .collect import GradientCollector, tracked_modules
from .curvature import Curvature, CurvatureConfig, fit_curvature
from .errors import UserError
from .evaluate import RetrainLM, leave_k_out, lds, retrain_losses, seed_ceiling, subset_masks, tail_patch
from .index import Index
from .methods.gradient import CosineScorer, Scorer, TrackStarScorer, make_scorer
from .methods.influence import InfluenceFunction, dense_gauss_newton
from .methods.magic import Trainer, TrainingRun, magic_scores
from .methods.source import Segment, segments_from_trainer_state, source_scores
from .methods.tracin import tracin
from .methods.trak import trak_scores
from .projection import ProjectionConfig
from .store import ChecksumError, GradientStore
from .task import ClassificationTask, LanguageModelTask, ModuleTask

__all__ = [
    "BuildConfig", "build_index", "GradientCollector", "tracked_modules", "Curvature", "CurvatureConfig",
    "fit_curvature", "UserError", "RetrainLM", "leave_k_out", "lds", "retrain_losses", "seed_ceiling", "subset_masks", "tail_patch",
    "Index", "CosineScorer", "Scorer", "TrackStarScorer", "make_scorer", "InfluenceFunction",
    "dense_gauss_newton", "Trainer", "TrainingRun", "magic_scores", "Segment", "segments_from_trainer_state",
    "source_scores", "tracin", "trak_scores", "ProjectionConfig", "ChecksumError", "GradientStore",
    "ClassificationTask", "LanguageModelTask", "ModuleTask",
]
__version__ = "0.1.0"
