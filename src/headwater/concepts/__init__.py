"""Concepts: directions in a model's activations (probes, SAE features, user vectors) that serve
as measurements for every attribution method and drive the fast probe approximations.

    concept = train_probe(model, task, positive, negative, layer=6)
    scores = EKFAC(model, task).fit(train).score(prompts, concept.measurement())   # Concept Influence
    fast = ProbeProjection(model, task).fit(train).score(None, concept.measurement())
"""

from .config import ProbeConfig, ProbeTrainConfig
from .probe import fit_direction, mean_activations, train_probe
from .rate import concept_logits, concept_rate, sampled_responses
from .sae import SAE, load_sae, sae_concept, sae_site
from .vector import ConceptVector

__all__ = [
    "ConceptVector",
    "ProbeConfig",
    "ProbeTrainConfig",
    "SAE",
    "fit_direction",
    "load_sae",
    "mean_activations",
    "sae_concept",
    "sae_site",
    "concept_logits",
    "concept_rate",
    "sampled_responses",
    "train_probe",
]
