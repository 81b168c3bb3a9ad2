"""Corpus-level attribution: which label bins of a training corpus support which benchmarks.

labels.py (record labels joined by id) → bins.py (a corpus map: per-bin statistics streamed over
the scores, `accumulate.py`; the statistics in `stats.py`) → contrast.py (benchmark contrasts)
→ unlearn.py (causal validation by targeted unlearning) → report.py (figures and an HTML page).
"""

from .bins import BinsConfig, CorpusMap, bin_members, corpus_map
from .contrast import contrast, profile_correlations
from .filtering import filtering_experiment
from .labels import Labels, attach_labels, classify_records, labels_from_columns, labels_from_file, load_labels
from .unlearn import UnlearnConfig, unlearning_experiment

__all__ = [
    "BinsConfig",
    "CorpusMap",
    "Labels",
    "attach_labels",
    "bin_members",
    "classify_records",
    "contrast",
    "corpus_map",
    "filtering_experiment",
    "labels_from_columns",
    "labels_from_file",
    "load_labels",
    "profile_correlations",
    "UnlearnConfig",
    "unlearning_experiment",
]
