"""A concept measured on the model's own samples: the rate at which the model expresses it.

Teacher-forced Concept Influence asks which records raise vᵀh on *fixed* responses. A trait the
model learned to *write* (a tone, a dialect) changes which responses get sampled, not the probe's
reading of a given one, and a probe that reads the trait's words can then score the planted
records near chance (`headwater demo concepts`: AUROC 0.55). The rate measures both:

    samples = sampled_responses(model, tokenizer, prompts, n=32)
    rate = concept_rate(model, task, concept.measurement(), samples)      # a Function measurement
    scores = EKFAC(model, task).fit(train).score(samples, rate).mean_query()

With c(x, y) the concept's logit on a sampled response, the rate is E_{y~p_θ}[σ(c)], and its
gradient is E[σ'(c) ∇c] + E[(σ(c) − b) ∇log p_θ(y|x)] (the score-function identity; the baseline
b, the samples' mean σ(c), changes only the variance). The measurement on each sample is
σ(c) + sg(σ(c) − b)·log p_θ(y|x): its gradient averaged over the samples is the rate's.
"""

from __future__ import annotations

import torch

from ..architecture import Site, capture
from ..generate import completions
from ..measurement import Concept, Function
from ..task import LanguageModelTask


def sampled_responses(
    model, tokenizer, prompts: list[dict], n: int = 32, seed: int = 0, max_new_tokens: int = 32, batch_size: int = 64
) -> list[dict]:
    """`n` responses sampled from the model for each prompt record ({"prompt": ...}), as
    prompt/completion records; greedy decoding would miss a trait the model shows only sometimes."""
    texts = [p["prompt"] for p in prompts for _ in range(n)]
    answers = completions(model, tokenizer, texts, max_new_tokens=max_new_tokens, sample=True, seed=seed, batch_size=batch_size)
    return [{"id": f"s{i:05d}", "prompt": p, "completion": a} for i, (p, a) in enumerate(zip(texts, answers))]


def concept_logits(model, task: LanguageModelTask, concept: Concept, samples: list[dict], batch_size: int = 64) -> torch.Tensor:
    """c(x, y) of each sample [n] (the concept on its response tokens), without gradients."""
    from ..task import collated_batches, whole_examples

    examples = whole_examples(task, samples)
    with torch.no_grad():
        return torch.cat([concept(task, model, b).double() for b in collated_batches(task, examples, batch_size)])


def concept_rate(model, task: LanguageModelTask, concept: Concept, samples: list[dict], baseline: float | None = None) -> Function:
    """The concept's rate on the model's samples as a measurement (direction "up"); see the
    module docstring. `baseline`: b (default: the samples' mean σ(c))."""
    if baseline is None:
        baseline = float(torch.sigmoid(concept_logits(model, task, concept, samples)).mean())
    site = Site(concept.module, concept.read)

    def rate(model, batch):
        with capture(model, site) as seen:  # one forward pass gives log p and the activations
            log_p = -task.loss(model, batch)
        p = torch.sigmoid(concept.pooled(seen[-1], batch.get("target_mask")))
        return p + (p.detach() - baseline) * log_p

    return Function(rate, direction="up", name=f"{concept.name}: rate on sampled responses")
