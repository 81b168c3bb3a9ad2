"""Tasks: how records become model inputs, and how a batch becomes one loss per example.

A task is the measurement object shared by every method: the same `per_example_loss` gives the
training loss L(z) whose gradients go into the store and the query measurement f(z_q) whose
gradient is matched against them. Both are losses, so a positive dot product means a step on the
training example lowers the query loss: the library's sign convention (positive = helps).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Protocol

import torch
import torch.nn.functional as F

from .errors import UserError

Batch = dict[str, torch.Tensor]


class Task(Protocol):
    """What the collector needs from a task."""

    def encode(self, record: dict) -> list[Any]:
        """The examples of one record: one per attribution unit (a document, or each of its spans)."""

    def collate(self, examples: list[Any]) -> Batch:
        """Stack examples into a batch; padding must not change any example's loss."""

    def per_example_loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Loss of each example in the batch, shape [B]; examples must not interact."""

    def describe(self) -> dict:
        """JSON-able settings, recorded in the index manifest."""


def encode_records(task: Task, records) -> list:
    """Every example of every record, in record order (`records`: a list or a `datasets.Dataset`)."""
    return [ex for i in range(len(records)) for ex in task.encode(records[i])]


def collated_batches(task: Task, examples: list, batch_size: int) -> Iterator[Batch]:
    """Consecutive examples collated into batches of at most `batch_size`, one at a time."""
    for i in range(0, len(examples), batch_size):
        yield task.collate(examples[i : i + batch_size])


@dataclass
class ModuleTask:
    """A task for any `torch.nn.Module`: records are dicts of arrays, the loss is yours.

    `loss_fn(model, batch) -> Tensor[B]` must return one loss per example (e.g.
    `F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")`). The default collate
    stacks each field with `torch.as_tensor`.
    """

    loss_fn: Callable[[torch.nn.Module, Batch], torch.Tensor]
    collate_fn: Callable[[list[dict]], Batch] | None = None
    name: str = "module"

    def encode(self, record: dict) -> list[dict]:
        return [{k: v for k, v in record.items() if k != "id"}]

    def collate(self, examples: list[dict]) -> Batch:
        if self.collate_fn is not None:
            return self.collate_fn(examples)
        return {k: torch.stack([torch.as_tensor(e[k]) for e in examples]) for k in examples[0]}

    def per_example_loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return self.loss_fn(model, batch)

    def describe(self) -> dict:
        return {"type": "module", "name": self.name}


@dataclass
class ClassificationTask:
    """Classification of records `{x: features, y: class}` by a model returning logits [B, C].

    Loss: cross-entropy. Output (TRAK): the margin logit_y − logsumexp(other logits). True
    Fisher: cross-entropy against classes sampled from the model's softmax.
    """

    input_key: str = "x"
    label_key: str = "y"
    dtype: torch.dtype = torch.float32

    def encode(self, record: dict) -> list[dict]:
        try:
            return [{"x": torch.as_tensor(record[self.input_key], dtype=self.dtype), "y": torch.as_tensor(record[self.label_key], dtype=torch.long)}]
        except KeyError as exc:
            raise UserError(f"record is missing the column {exc.args[0]!r} (it has {sorted(record)})") from None

    def collate(self, examples: list[dict]) -> Batch:
        return {"x": torch.stack([e["x"] for e in examples]), "y": torch.stack([e["y"] for e in examples])}

    def per_example_loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")

    def per_example_sampled_loss(self, model: torch.nn.Module, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        logits = model(batch["x"])
        with torch.no_grad():
            sampled = torch.multinomial(logits.float().softmax(-1).cpu(), 1, generator=generator).squeeze(1).to(logits.device)
        return F.cross_entropy(logits, sampled, reduction="none")

    def per_example_output(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        logits = model(batch["x"])
        correct = logits.gather(1, batch["y"][:, None]).squeeze(1)
        others = logits.scatter(1, batch["y"][:, None], -torch.inf)
        return correct - torch.logsumexp(others, dim=1)

    def describe(self) -> dict:
        return {"type": "classification", "input_key": self.input_key, "label_key": self.label_key}


@dataclass
class TokenExample:
    """One unit of a causal-LM record. `target_mask[t]` says token t is predicted (has loss)."""

    input_ids: list[int]
    target_mask: list[bool]


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Half precision upcast to float32; float64 stays float64 (float64 references stay exact)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


@dataclass
class LanguageModelTask:
    """Causal-LM loss on a record's target tokens, summed over tokens.

    Record formats (`format="auto"` picks by the columns present):
      - `messages`: chat turns; loss on assistant turns, rendered with the tokenizer's chat template;
      - `prompt` + `completion`: loss on the completion only;
      - `text`: loss on every token.

    `unit="sentence"` makes each sentence of the target text its own example (span-level
    attribution): its loss is that sentence's tokens, with the preceding text as context.
    `unit="token"` makes each target token its own example (per-token attribution: which tokens
    of a document carry the influence). A record then has several rows in the index and its
    score is pooled over them.
    """

    tokenizer: Any
    max_length: int | None = None
    format: Literal["auto", "text", "prompt_completion", "messages"] = "auto"
    unit: Literal["document", "sentence", "token"] = "document"
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    stats: dict = field(default_factory=lambda: {"examples": 0, "truncated": 0, "empty": 0})

    def __post_init__(self):
        if self.tokenizer is None:
            raise UserError("a LanguageModelTask needs a tokenizer")
        if not getattr(self.tokenizer, "is_fast", False):
            raise UserError("a fast (Rust) tokenizer is needed for character offsets; load it with use_fast=True")
        if self.max_length is None:
            limit = getattr(self.tokenizer, "model_max_length", None)
            self.max_length = int(limit) if limit and limit < 1_000_000 else 1024

    def record_format(self, record: dict) -> str:
        if self.format != "auto":
            return self.format
        # A column another record of the same data set has is present here as None: not this format.
        has = lambda f: record.get(f) is not None
        if has(self.messages_field):
            return "messages"
        if has(self.prompt_field) and has(self.completion_field):
            return "prompt_completion"
        if has(self.text_field):
            return "text"
        raise UserError(
            f"record has none of the columns {self.text_field!r}, {self.prompt_field!r}+{self.completion_field!r} "
            f"or {self.messages_field!r} (it has {sorted(record)})"
        )

    def target_text(self, record: dict) -> tuple[str, list[tuple[int, int]]]:
        """The full text and the character spans whose tokens carry loss."""
        fmt = self.record_format(record)
        try:
            if fmt == "text":
                text = record[self.text_field]
                return text, [(0, len(text))]
            if fmt == "prompt_completion":
                prompt, completion = record[self.prompt_field], record[self.completion_field]
                return prompt + completion, [(len(prompt), len(prompt) + len(completion))]
            return self._chat_spans(record[self.messages_field])
        except KeyError as exc:
            raise UserError(f"record is missing the column {exc.args[0]!r} needed for format {fmt!r} (it has {sorted(record)})") from None

    def _chat_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise UserError("chat records need a tokenizer with a chat template")
        render = lambda msgs, gen: self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        text = render(messages, False)
        spans = []
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            before, through = render(messages[:i], True), render(messages[: i + 1], False)
            if not (text.startswith(through) and through.startswith(before)):
                raise UserError("the chat template does not render conversations prefix-consistently; cannot locate assistant turns")
            spans.append((len(before), len(through)))
        return text, spans

    def encode(self, record: dict) -> list[TokenExample]:
        text, spans = self.target_text(record)
        enc = self.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        covers = lambda unit: [e > b and any(s < e and b < t for s, t in unit) for b, e in offsets]
        if self.unit == "document":
            masks = [covers(spans)]
        elif self.unit == "sentence":
            masks = [covers([s]) for s in sentence_spans(text, spans)]
        else:  # token: one unit per predicted token (the first token has no context to predict it)
            masks = [[j == t for j in range(len(ids))] for t, m in enumerate(covers(spans)) if m and t > 0]
        examples = []
        for mask in masks:
            last = max((t for t, m in enumerate(mask) if m), default=-1) + 1
            unit_ids, unit_mask = ids[:last], mask[:last]
            self.stats["examples"] += 1
            if len(unit_ids) > self.max_length:
                self.stats["truncated"] += 1
                unit_ids, unit_mask = unit_ids[: self.max_length], unit_mask[: self.max_length]
            if not any(unit_mask[1:]):
                self.stats["empty"] += 1
            examples.append(TokenExample(unit_ids or [self.pad_id], unit_mask or [False]))
        return examples

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else (self.tokenizer.eos_token_id or 0)

    def collate(self, examples: list[TokenExample]) -> Batch:
        T = max(len(e.input_ids) for e in examples)
        ids = torch.full((len(examples), T), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(examples), T), dtype=torch.long)
        tgt = torch.zeros((len(examples), T), dtype=torch.bool)
        for i, e in enumerate(examples):  # right padding keeps position ids of real tokens unchanged
            n = len(e.input_ids)
            ids[i, :n] = torch.tensor(e.input_ids)
            attn[i, :n] = 1
            tgt[i, :n] = torch.tensor(e.target_mask)
        return {"input_ids": ids, "attention_mask": attn, "target_mask": tgt}

    def per_token_loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Loss of each predicted token, [B, T-1] (entry t is token t+1's loss; zero off target)."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        B, T, V = logits.shape
        nll = F.cross_entropy(
            at_least_float32(logits[:, :-1].reshape(-1, V)), batch["input_ids"][:, 1:].reshape(-1), reduction="none"
        ).view(B, T - 1)
        return nll * batch["target_mask"][:, 1:]

    def per_example_loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return self.per_token_loss(model, batch).sum(1)

    def per_example_sampled_loss(self, model: torch.nn.Module, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        """The loss with each target token replaced by a sample from the model (true Fisher), [B]."""
        logits = at_least_float32(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1])
        B, T, V = logits.shape
        with torch.no_grad():
            probs = logits.softmax(-1).reshape(-1, V).cpu()
            sampled = torch.multinomial(probs, 1, generator=generator).view(B, T).to(logits.device)
        nll = F.cross_entropy(logits.reshape(-1, V), sampled.reshape(-1), reduction="none").view(B, T)
        return (nll * batch["target_mask"][:, 1:]).sum(1)

    def per_example_output(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """TRAK's measurement for LMs: log p/(1-p) of the target tokens (p their joint probability)."""
        log_p = -self.per_example_loss(model, batch)
        return log_p - torch.log1p(-log_p.exp().clamp(max=1 - 1e-6))

    def encode_whole(self, record: dict) -> TokenExample:
        """The record as one example with all its target tokens (token units are computed from it)."""
        return dataclasses.replace(self, unit="document", stats=self.stats).encode(record)[0]

    def warn_truncation(self) -> None:
        """Warn once about examples cut to the context length or left with no target tokens."""
        s = self.stats
        if s["truncated"]:
            warnings.warn(
                f"{s['truncated']} of {s['examples']} examples were longer than the context "
                f"({self.max_length} tokens) and were truncated",
                stacklevel=2,
            )
        if s["empty"]:
            warnings.warn(f"{s['empty']} of {s['examples']} examples have no target tokens (zero gradient)", stacklevel=2)

    def describe(self) -> dict:
        return {
            "type": "language_model",
            "format": self.format,
            "unit": self.unit,
            "max_length": self.max_length,
            "fields": [self.text_field, self.prompt_field, self.completion_field, self.messages_field],
        }


def sentence_spans(text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Split each character span of `text` into sentences (whitespace between them dropped)."""
    out = []
    for start, end in spans:
        pos = start
        for m in SENTENCE_END.finditer(text, start, end):
            if m.start() > pos:
                out.append((pos, m.start()))
            pos = m.end()
        if end > pos:
            out.append((pos, end))
    return out
