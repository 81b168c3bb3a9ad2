"""A behaviour to attribute to components: clean/corrupt input pairs and a metric on each pair.

`PromptPairs` is the language-model case: clean and corrupt prompts of equal token length,
each with its answer; the metric is the logit difference of the clean and the corrupt answer at
the last prompt position, or a concept's value averaged over the prompt. `TensorPairs` is any
module with tensor inputs and a metric function. Both give the metric per pair, [N], from
inputs, and from *embedded* inputs (token embeddings for language models), which integrated
gradients interpolate between corrupt and clean.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..architecture import Site, capture
from ..errors import UserError
from ..measurement import Concept


@dataclass
class TensorPairs:
    """Clean and corrupt inputs [N, ...] of any model and `metric(model, x) -> [N]`."""

    clean: torch.Tensor
    corrupt: torch.Tensor
    metric_fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
    ids: list = field(default_factory=list)
    name: str = "metric"

    def __post_init__(self):
        if self.clean.shape != self.corrupt.shape:
            raise UserError(f"clean and corrupt inputs differ in shape: {tuple(self.clean.shape)} vs {tuple(self.corrupt.shape)}")
        self.ids = list(self.ids) or list(range(len(self.clean)))

    def inputs(self, which: str) -> torch.Tensor:
        return self.clean if which == "clean" else self.corrupt

    def metric(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.metric_fn(model, x)

    def embed(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x

    def metric_embedded(self, model: torch.nn.Module, e: torch.Tensor) -> torch.Tensor:
        return self.metric_fn(model, e)

    def describe(self) -> dict:
        return {"name": self.name, "direction": "up", "patching": "denoising: clean activations into the corrupt run"}


@dataclass
class PromptPairs:
    """Clean/corrupt prompt pairs of a causal LM, right-padded to one length [N, T].

    `metric="logit-diff"`: logit(clean answer) − logit(corrupt answer) at each pair's last prompt
    token; or a `Concept`: its value averaged over the prompt's tokens.
    """

    clean_ids: torch.Tensor
    corrupt_ids: torch.Tensor
    mask: torch.Tensor
    last: torch.Tensor
    answers: torch.Tensor | None
    concept: Concept | None = None
    ids: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.concept.name if self.concept is not None else "logit-diff"

    @classmethod
    def from_records(cls, tokenizer, clean: list[dict], corrupt: list[dict], metric: str | Concept = "logit-diff") -> PromptPairs:
        """Pairs from records with a `prompt` (and, for logit-diff, an `answer`: the clean
        record's is the answer the behaviour gives, the corrupt record's the alternative)."""
        if len(clean) != len(corrupt):
            raise UserError(f"{len(clean)} clean prompts but {len(corrupt)} corrupt ones: they pair up one to one")
        if not clean:
            raise UserError("no prompt pairs given")
        concept = metric if isinstance(metric, Concept) else None
        if concept is None and metric != "logit-diff":
            raise UserError(f"unknown component metric {metric!r}; logit-diff or a concept")
        tok = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
        rows, answers = [], []
        for i, (c, k) in enumerate(zip(clean, corrupt)):
            for r, which in ((c, "clean"), (k, "corrupt")):
                if not r.get("prompt"):
                    raise UserError(f"{which} record {i} has no prompt")
                if concept is None and not r.get("answer"):
                    raise UserError(f"{which} record {i} has no answer (the logit difference compares the two answers)")
            a, b = tok(c["prompt"]), tok(k["prompt"])
            if len(a) != len(b):
                raise UserError(
                    f"pair {i}: the clean prompt has {len(a)} tokens, the corrupt one {len(b)}; "
                    "patching swaps activations position by position, so they must have the same length"
                )
            rows.append((a, b))
            if concept is None:
                answers.append((tok(c["answer"])[0], tok(k["answer"])[0]))
        T = max(len(a) for a, _ in rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        clean_ids = torch.full((len(rows), T), pad, dtype=torch.long)
        corrupt_ids, mask = clean_ids.clone(), torch.zeros(len(rows), T, dtype=torch.bool)
        for i, (a, b) in enumerate(rows):
            clean_ids[i, : len(a)], corrupt_ids[i, : len(b)], mask[i, : len(a)] = torch.tensor(a), torch.tensor(b), True
        last = mask.sum(1) - 1
        ids = [r.get("id", i) for i, r in enumerate(clean)]
        return cls(clean_ids, corrupt_ids, mask, last, torch.tensor(answers) if answers else None, concept, ids)

    def inputs(self, which: str) -> torch.Tensor:
        return self.clean_ids if which == "clean" else self.corrupt_ids

    def metric(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self._metric(model, input_ids=x.to(_device(model)))

    def embed(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.get_input_embeddings()(x.to(_device(model)))

    def metric_embedded(self, model: torch.nn.Module, e: torch.Tensor) -> torch.Tensor:
        return self._metric(model, inputs_embeds=e)

    def _metric(self, model: torch.nn.Module, **inputs) -> torch.Tensor:
        mask = self.mask.to(_device(model))
        if self.concept is not None:
            with capture(model, Site(self.concept.module, self.concept.read)) as seen:
                model(attention_mask=mask.long(), **inputs)
            return self.concept.pooled(seen[-1], mask)
        logits = model(attention_mask=mask.long(), **inputs).logits
        at_last = logits[torch.arange(len(logits)), self.last.to(logits.device)]
        answers = self.answers.to(logits.device)
        return at_last.gather(1, answers[:, :1]).squeeze(1) - at_last.gather(1, answers[:, 1:]).squeeze(1)

    def describe(self) -> dict:
        desc = {"name": self.name, "direction": "up", "patching": "denoising: clean activations into the corrupt run"}
        return desc | ({"module": self.concept.module} if self.concept is not None else {})


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
