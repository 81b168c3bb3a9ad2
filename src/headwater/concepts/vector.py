"""`ConceptVector`: a direction at a site of the model, saved as safetensors + JSON.

Every kind of concept (a trained probe, a difference of class means, an SAE feature, a user's
vector) ends up as v [d] and a bias b at a site; the concept's value on an example is vᵀh + b
averaged over the example's response tokens. `measurement()` turns it into the `Concept`
measurement every attribution method accepts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..architecture import Site
from ..errors import UserError
from ..measurement import Concept, Measurement, measurement_named

KINDS = ("logistic", "mean-diff", "sae-encoder", "sae-decoder", "vector")
TENSORS, META = "concept.safetensors", "concept.json"


@dataclass
class ConceptVector:
    """v [d] and bias b at `site`, of a `kind` in KINDS; `info` holds how it was made (held-out
    accuracy, example counts, the SAE and feature), saved with it."""

    vector: torch.Tensor = field(repr=False)
    site: Site
    kind: str = "vector"
    bias: float = 0.0
    name: str = "concept"
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UserError(f"unknown concept kind {self.kind!r}; one of {', '.join(KINDS)}")
        self.vector = torch.as_tensor(self.vector).detach().reshape(-1).float().cpu()
        if not torch.isfinite(self.vector).all() or not self.vector.any():
            raise UserError(f"the concept {self.name!r} has a zero or non-finite direction")

    def measurement(self) -> Concept:
        """The concept as a measurement (direction "up": more of the concept)."""
        return Concept(self.vector, self.site.module, self.site.read, float(self.bias), self.name)

    def save(self, path: str | Path) -> Path:
        """Write `path/concept.safetensors` (the vector) and `path/concept.json` (the rest)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"format": "headwater.concept/1", "name": self.name, "kind": self.kind, "bias": float(self.bias)}
        meta |= {"module": self.site.module, "read": self.site.read, "dim": self.vector.numel(), "info": self.info}
        save_file({"vector": self.vector.contiguous()}, str(path / TENSORS))
        (path / META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> ConceptVector:
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / META).exists() or not (path / TENSORS).exists():
            raise UserError(f"{path} is not a saved concept (no {META} and {TENSORS}); make one with `headwater probe`")
        meta = json.loads((path / META).read_text())
        vector = load_file(str(path / TENSORS))["vector"]
        return cls(vector, Site(meta["module"], meta["read"]), meta["kind"], meta["bias"], meta["name"], meta.get("info", {}))

    def describe(self) -> str:
        acc = self.info.get("accuracy")
        extra = f", held-out accuracy {acc:.3f}" if acc is not None else ""
        return f"{self.name}: {self.kind} direction of {self.vector.numel()} dims at {self.site.module} ({self.site.read}){extra}"


def resolve_measurement(name: str, probe: str | Path | None = None) -> Measurement | None:
    """A `--measurement` choice as a measurement (None for "default": the method's own);
    "concept" is the concept saved at `probe`."""
    if name in ("concept", "concept-rate"):  # attribute wraps the concept-rate's concept in concept_rate
        if not probe:
            raise UserError(f"--measurement {name} needs the concept's directory (--probe)")
        return ConceptVector.load(probe).measurement()
    if probe:
        raise UserError(f"--probe is read by --measurement concept and the probe methods, not by --measurement {name}")
    return None if name == "default" else measurement_named(name)
