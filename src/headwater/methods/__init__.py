"""Attribution methods, each `Method(...).fit(train).score(queries, measurement=...) -> Scores`."""

from ..config import BM25Config
from .bm25 import BM25
from .gradient import Cosine, Dot, TrackStar
from .influence import EKFAC, KFAC, InfluenceFunction
from .magic import MAGIC
from .source import SOURCE
from .tracin import TracIn
from .trak import TRAK

METHODS = {m.name: m for m in (Dot, Cosine, TrackStar, TracIn, EKFAC, KFAC, TRAK, SOURCE, MAGIC, BM25)}

__all__ = ["BM25", "BM25Config", "Cosine", "Dot", "TrackStar", "EKFAC", "KFAC", "InfluenceFunction", "MAGIC", "SOURCE", "TracIn", "TRAK", "METHODS"]
