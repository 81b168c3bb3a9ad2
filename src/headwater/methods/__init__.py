"""Attribution methods, each `Method(...).fit(train).score(queries, measurement=...) -> Scores`."""

from ..config import BM25Config
from .bm25 import BM25
from .gradient import Cosine, Dot, TrackStar
from .influence import EKFAC, KFAC, InfluenceFunction
from .magic import MAGIC
from .probe import ActivationGradient, ProbeProjection, ProjectionDifference
from .source import SOURCE
from .tracin import TracIn
from .trak import TRAK

QUERY_METHODS = (Dot, Cosine, TrackStar, TracIn, EKFAC, KFAC, TRAK, SOURCE, MAGIC, BM25)
CONCEPT_METHODS = (ProbeProjection, ProjectionDifference, ActivationGradient)  # score records against a concept, no queries
METHODS = {m.name: m for m in QUERY_METHODS + CONCEPT_METHODS}

__all__ = [
    "ActivationGradient",
    "ProbeProjection",
    "ProjectionDifference",
    "CONCEPT_METHODS",
    "BM25",
    "BM25Config",
    "Cosine",
    "Dot",
    "TrackStar",
    "EKFAC",
    "KFAC",
    "InfluenceFunction",
    "MAGIC",
    "SOURCE",
    "TracIn",
    "TRAK",
    "METHODS",
]
