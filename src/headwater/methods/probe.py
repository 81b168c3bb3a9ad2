"""Fast approximations of Concept Influence, streaming over the training records.

    concept = ConceptVector.load("runs/probe").measurement()
    scores = ProbeProjection(model, task).fit(train).score(None, concept)       # [records, 1]

The concept is the query: these methods score each training record against it directly.

- `probe` (ProbeProjection): the record's own concept value vᵀh̄ + b, h̄ its activations at the
  concept's site averaged over its response tokens. Forward passes that stop at the site.
- `probe-diff` (ProjectionDifference): that value minus the value of the model's own greedy
  response to the record's prompt (how much more of the concept the record shows than the model
  already does). One generation per record, cached (`ProbeConfig.generations`).
- `probe-grad` (ActivationGradient): −vᵀ Σ_t ∂L(z)/∂h_t, the first-order change of the concept
  when training on z moves the activations at the site. A backward pass down to the site only.
  It is exactly Concept Influence when the only parameter is a bias added at the site and the
  curvature is the identity (tests/test_concepts.py checks that identity).

Positive = training on the record raises the concept (for probe/probe-diff: the record shows
more of it), as for every method.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..architecture import Site, capture
from ..collect import model_fingerprint
from ..concepts.config import ProbeConfig
from ..concepts.probe import mean_activations
from ..errors import UserError
from ..generate import CompletionCache
from ..measurement import Concept, Measurement
from ..task import LanguageModelTask, Task, collated_batches, whole_examples
from .base import Blocks, Method, record_blocks, training_data


class ProbeProjection(Method):
    """Each training record's own concept value (forward passes only)."""

    name = "probe"
    config_class = ProbeConfig

    def __init__(self, model: torch.nn.Module | None = None, task: Task | None = None, config: ProbeConfig | None = None):
        self.model, self.task = model, task
        self.config = config or ProbeConfig()

    def fit(self, train, progress: bool = False) -> ProbeProjection:
        self.data = training_data(train)
        index = self.data.index
        if index is not None:
            self.model = self.model if self.model is not None else index.model()
            self.task = self.task if self.task is not None else index.task()
        if self.model is None or self.task is None:
            raise UserError(f"{type(self).__name__} needs model= and task= (or an index)")
        self.progress = progress
        return self

    def default_measurement(self) -> Measurement:
        raise UserError(f"{self.name} scores records against a concept: pass measurement=concept.measurement() (command line: --probe DIR)")

    def score_blocks(self, queries, measurement: Measurement, by: str | None = None) -> Blocks:
        if not isinstance(measurement, Concept):
            raise UserError(f"{self.name} needs a Concept measurement, got {measurement.describe()['name']!r}")
        if queries is not None:
            raise UserError(f"{self.name} scores the training records against the concept itself; pass queries=None")
        self.fitted()
        yield from record_blocks(self.record_values(measurement)[:, None].double())

    def record_values(self, concept: Concept) -> torch.Tensor:
        """One value per training record, [n]."""
        return self.concept_values(concept, self.data.records)

    def concept_values(self, concept: Concept, records) -> torch.Tensor:
        h = mean_activations(self.model, self.task, records, Site(concept.module, concept.read), self.config.batch_size, self.progress)
        return concept.pooled(h, None)


class ProjectionDifference(ProbeProjection):
    """The record's concept value minus that of the model's own response to its prompt."""

    name = "probe-diff"

    def record_values(self, concept: Concept) -> torch.Tensor:
        if not isinstance(self.task, LanguageModelTask):
            raise UserError("the projection difference compares a record's response with the model's own: it needs a LanguageModelTask")
        prompts = [_prompt(self.task, self.data.records[i]) for i in range(len(self.data))]
        cfg = self.config
        cache = CompletionCache(cfg.generations, model_fingerprint(self.model), cfg.max_new_tokens)
        own = cache.complete(self.model, self.task.tokenizer, prompts, cfg.batch_size, self.progress)
        own_records = [{"prompt": p, "completion": c} for p, c in zip(prompts, own)]
        return self.concept_values(concept, self.data.records) - self.concept_values(concept, own_records)


def _prompt(task: LanguageModelTask, record: dict) -> str:
    """The text a record's (last) response answers."""
    fmt = task.record_format(record)
    if fmt == "prompt_completion":
        return record[task.prompt_field]
    if fmt == "messages":
        messages = record[task.messages_field]
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise UserError("a chat record without an assistant turn has no response to compare")
        return task.tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
    raise UserError("the projection difference needs records with a prompt (prompt/completion or chat), not plain text")


class ActivationGradient(ProbeProjection):
    """−vᵀ Σ_t ∂L(z)/∂h_t: the concept's first-order change through the site's activations."""

    name = "probe-grad"

    def record_values(self, concept: Concept) -> torch.Tensor:
        site, out = Site(concept.module, concept.read), []
        examples = whole_examples(self.task, self.data.records)
        bar = tqdm(total=len(examples), desc="activation gradients", unit="rec", disable=not self.progress)
        # Detaching at the site makes the backward pass stop there (no parameter gradients).
        with torch.enable_grad(), capture(self.model, site, replace=lambda x: x.detach().requires_grad_()) as seen:
            for batch in collated_batches(self.task, examples, self.config.batch_size):
                seen.clear()
                loss = self.task.loss(self.model, batch)
                (g,) = torch.autograd.grad(loss.sum(), seen[-1])  # examples do not interact: row b is ∂L_b/∂h_b
                g = g.sum(1) if g.dim() == 3 else g
                out.append(-(g @ concept.vector.to(g)).detach().double().cpu())
                bar.update(len(loss))
        bar.close()
        return torch.cat(out)
