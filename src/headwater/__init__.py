"""headwater: attribute a model's behaviour to its training data, stages and concepts.

    import headwater as hw
    index = hw.build_index("runs/idx", model, records, task=hw.LanguageModelTask(tokenizer))
    top = index.query(queries, method="trackstar", top_k=20)
"""

from .build import BuildConfig, build_index
from .collect import GradientCollector, tracked_modules
from .errors import UserError
from .index import Index
from .methods.gradient import CosineScorer, Scorer, TrackStarScorer, make_scorer
from .projection import ProjectionConfig
from .store import ChecksumError, GradientStore
from .task import LanguageModelTask, ModuleTask

__all__ = [
    "BuildConfig", "build_index", "GradientCollector", "tracked_modules", "UserError", "Index",
    "CosineScorer", "Scorer", "TrackStarScorer", "make_scorer", "ProjectionConfig",
    "ChecksumError", "GradientStore", "LanguageModelTask", "ModuleTask",
]
__version__ = "0.1.0"
