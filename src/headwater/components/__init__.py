"""Component attribution: which heads, MLPs and neurons carry a behaviour, given clean/corrupt
input pairs and a metric.

    pairs = PromptPairs.from_records(tokenizer, clean, corrupt)             # logit difference
    scores = attribution_patching(model, pairs, transformer_components(model))   # Scores [components, pairs]
    check = exact_patching(model, pairs, top_components)
"""

from .behaviour import PromptPairs, TensorPairs
from .edges import edge_attribution_patching, edge_table
from .patching import attribution_patching, component_table, exact_patching, faithfulness, faithfulness_curve
from .units import Component, module_components, transformer_components

__all__ = [
    "Component",
    "PromptPairs",
    "TensorPairs",
    "attribution_patching",
    "component_table",
    "edge_attribution_patching",
    "edge_table",
    "exact_patching",
    "faithfulness",
    "faithfulness_curve",
    "module_components",
    "transformer_components",
]
