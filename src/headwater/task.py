"""Tasks: how records become model inputs, and the training loss of each example.

A task is data handling plus the training loss, and nothing else: what a query *asks about* is a
separate `Measurement` (measurement.py). A task holds settings only (no state changes while it
runs), so the same task object can serve every method, process and rank.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from .errors import UserError

Batch = dict[str, torch.Tensor]


@runtime_checkable
class Task(Protocol):
    """Everything the library uses from a task.

    `unit` says how many rows a record gets: "document" one; "sentence" one per sentence (one
    example each); "token" one per predicted token (one example holding them all, which the
    collector splits into rows).
    """

    unit: str

    def encode(self, record: dict) -> list[Any]:
        """The examples of one record, one per attribution unit (token units: one example)."""

    def whole(self, record: dict) -> Any:
        """The record as a single example with all its targets (queries and training runs)."""

    def collate(self, examples: list[Any]) -> Batch:
        """Stack examples into a batch; padding must not change any example's loss."""

    def loss(self, model: torch.nn.Module, batch: Batch, sample: torch.Generator | None = None) -> torch.Tensor:
        """Training loss of each example, [B]; examples must not interact. With `sample`, the
        targets are drawn from the model's own predictive distribution (the true Fisher)."""

    def token_loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Loss of each target position, [B, T'] (zero off target); `loss` is its sum over T'."""

    def log_odds(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """log p/(1−p) of each example's target under the model, [B] (classification: the margin)."""

    def check(self, examples: list[Any]) -> dict[str, int]:
        """How many of `examples` have each encoding problem, keyed by a description of it."""

    def describe(self) -> dict:
        """JSON-able settings, recorded in an index's manifest and in result files."""


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Half precision upcast to float32; float64 stays float64 (float64 references stay exact)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def log_odds_from_nll(nll: torch.Tensor) -> torch.Tensor:
    """log p/(1−p) from −log p, stable for p near 1 (small nll) and near 0."""
    nll = nll.clamp_min(torch.finfo(nll.dtype).tiny)
    return -nll - torch.log(-torch.expm1(-nll))


def encode_records(task: Task, records) -> list:
    """Every example of every record, in record order (`records`: a list or a `datasets.Dataset`)."""
    return [ex for i in range(len(records)) for ex in task.encode(records[i])]


def targets_in(batch: dict) -> int:
    """How many predicted targets a batch holds (its target tokens; one per example otherwise)."""
    mask = batch.get("target_mask")
    return int(mask[:, 1:].sum()) if mask is not None else len(next(iter(batch.values())))


def batch_normaliser(batch: dict, batch_loss: str) -> int:
    """What a run divided a batch's summed loss by: its target tokens (token-mean, the Hugging
    Face Trainer) or its examples (example-mean)."""
    return targets_in(batch) if batch_loss == "token-mean" else len(next(iter(batch.values())))


def whole_examples(task: Task, records) -> list:
    """One example per record, with all its targets."""
    return [task.whole(records[i]) for i in range(len(records))]


def collated_batches(task: Task, examples: list, batch_size: int) -> Iterator[Batch]:
    """Consecutive examples collated into batches of at most `batch_size`, one at a time."""
    for i in range(0, len(examples), batch_size):
        yield task.collate(examples[i : i + batch_size])


def batch_to(batch: Batch, device) -> Batch:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------------- any module


@dataclass
class ModuleTask:
    """A task for any `torch.nn.Module` whose records are dicts of arrays.

    `loss_fn` is "cross_entropy" (the model maps `batch[input_key]` to logits [B, C], the target
    `batch[target_key]` is a class), "mse" (predictions [B] or [B, D]; the true Fisher samples
    targets from a Gaussian with variance ½, whose Fisher is the Gauss–Newton matrix), or your own
    `loss_fn(model, batch) -> Tensor[B]` (give it a third parameter, `sample`, to support the
    true Fisher: with a generator, draw the targets from the model). `forward(model, batch)`
    replaces `model(batch[input_key])`; `dtype` casts floating inputs.
    """

    loss_fn: str | Callable = "cross_entropy"
    input_key: str = "x"
    target_key: str = "y"
    forward: Callable[[torch.nn.Module, Batch], torch.Tensor] | None = None
    collate_fn: Callable[[list[dict]], Batch] | None = None
    dtype: torch.dtype | None = None
    unit: str = "document"

    def __post_init__(self):
        if isinstance(self.loss_fn, str) and self.loss_fn not in ("cross_entropy", "mse"):
            raise UserError(f"unknown loss {self.loss_fn!r}; use 'cross_entropy', 'mse' or a function")
        if self.unit != "document":
            raise UserError("a ModuleTask has one example per record (unit='document')")

    def encode(self, record: dict) -> list[dict]:
        return [self.whole(record)]

    def whole(self, record: dict) -> dict:
        if isinstance(self.loss_fn, str):
            missing = [k for k in (self.input_key, self.target_key) if k not in record]
            if missing:
                raise UserError(f"record is missing the column {missing[0]!r} (it has {sorted(record)})")
        return {k: v for k, v in record.items() if k != "id"}

    def collate(self, examples: list[dict]) -> Batch:
        if self.collate_fn is not None:
            return self.collate_fn(examples)
        batch = {k: torch.stack([torch.as_tensor(e[k]) for e in examples]) for k in examples[0]}
        if self.dtype is not None:
            batch = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in batch.items()}
        return batch

    def outputs(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return self.forward(model, batch) if self.forward is not None else model(batch[self.input_key])

    def loss(self, model: torch.nn.Module, batch: Batch, sample: torch.Generator | None = None) -> torch.Tensor:
        if callable(self.loss_fn):
            if sample is None:
                return self.loss_fn(model, batch)
            if len(inspect.signature(self.loss_fn).parameters) < 3:
                raise UserError(
                    "the true Fisher needs targets sampled from the model: give loss_fn a third parameter, "
                    "sample (a torch.Generator), or use fisher='empirical'"
                )
            return self.loss_fn(model, batch, sample)
        out = self.outputs(model, batch)
        if self.loss_fn == "cross_entropy":
            target = batch[self.target_key].long()
            if sample is not None:
                with torch.no_grad():
                    probs = at_least_float32(out.detach()).softmax(-1).cpu()
                    target = torch.multinomial(probs, 1, generator=sample).squeeze(1).to(out.device)
            return F.cross_entropy(out, target, reduction="none")
        target = batch[self.target_key].to(out.dtype).reshape(out.shape)
        if sample is not None:
            noise = torch.randn(out.shape, generator=sample, dtype=out.dtype).to(out.device)
            target = out.detach() + noise * 0.5**0.5
        return (out - target).square().reshape(len(out), -1).sum(1)

    def token_loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return self.loss(model, batch)[:, None]

    def log_odds(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        if self.loss_fn == "mse":
            raise UserError("log-odds need a classification loss; for regression use the loss as the output (TRAK: output='loss')")
        if callable(self.loss_fn):  # taken to be a negative log-likelihood
            return log_odds_from_nll(self.loss(model, batch))
        logits = self.outputs(model, batch)
        y = batch[self.target_key].long()[:, None]
        return logits.gather(1, y).squeeze(1) - torch.logsumexp(logits.scatter(1, y, -torch.inf), dim=1)

    def check(self, examples: list) -> dict[str, int]:
        return {}

    def describe(self) -> dict:
        loss = self.loss_fn if isinstance(self.loss_fn, str) else getattr(self.loss_fn, "__name__", "custom")
        return {"type": "module", "loss": loss, "input_key": self.input_key, "target_key": self.target_key}


def is_classifier(task: Task) -> bool:
    """Whether the task is a ModuleTask classifier (cross-entropy over classes), whose Fisher and
    Gauss–Newton matrix can be taken over every class."""
    return isinstance(task, ModuleTask) and task.loss_fn == "cross_entropy"


# ------------------------------------------------------------------------------- language models


@dataclass
class TokenExample:
    """One unit of a causal-LM record. `target_mask[t]` says token t is predicted (has loss)."""

    input_ids: list[int]
    target_mask: list[bool]
    truncated: bool = False


SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


@dataclass(frozen=True)
class LanguageModelTask:
    """Causal-LM loss on a record's target tokens, summed over tokens.

    Record formats (`format="auto"` picks by the columns present):
      - `messages`: chat turns; loss on assistant turns, rendered with the tokenizer's chat template;
      - `prompt` + `completion`: loss on the completion only;
      - `text`: loss on every token.

    `unit="sentence"` makes each sentence of the target text its own example (its loss is that
    sentence's tokens, with the preceding text as context); `unit="token"` gives each predicted
    token its own row. A record then has several rows in an index and its score is pooled.
    """

    tokenizer: Any
    max_length: int | None = None
    format: Literal["auto", "text", "prompt_completion", "messages"] = "auto"
    unit: Literal["document", "sentence", "token"] = "document"
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"

    def __post_init__(self):
        if self.tokenizer is None:
            raise UserError("a LanguageModelTask needs a tokenizer")
        if not getattr(self.tokenizer, "is_fast", False):
            raise UserError("a fast (Rust) tokenizer is needed for character offsets; load it with use_fast=True")
        if self.unit not in ("document", "sentence", "token"):
            raise UserError(f"unknown unit {self.unit!r}; choose document, sentence or token")
        if self.max_length is None:
            limit = getattr(self.tokenizer, "model_max_length", None)
            object.__setattr__(self, "max_length", int(limit) if limit and limit < 1_000_000 else 1024)

    def with_unit(self, unit: str) -> LanguageModelTask:
        return dataclasses.replace(self, unit=unit)

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
        if self.unit != "sentence":
            return [self.whole(record)]
        text, spans = self.target_text(record)
        ids, offsets = self._tokens(text)
        return [self._example(ids, self._covers(offsets, [s])) for s in sentence_spans(text, spans)]

    def whole(self, record: dict) -> TokenExample:
        text, spans = self.target_text(record)
        ids, offsets = self._tokens(text)
        return self._example(ids, self._covers(offsets, spans))

    def _tokens(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        return enc["input_ids"], enc["offset_mapping"]

    @staticmethod
    def _covers(offsets, spans) -> list[bool]:
        return [e > b and any(s < e and b < t for s, t in spans) for b, e in offsets]

    def _example(self, ids: list[int], mask: list[bool]) -> TokenExample:
        last = max((t for t, m in enumerate(mask) if m), default=-1) + 1
        ids, mask = ids[:last], mask[:last]
        truncated = len(ids) > self.max_length
        if truncated:
            ids, mask = ids[: self.max_length], mask[: self.max_length]
        return TokenExample(ids or [self.pad_id], mask or [False], truncated)

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

    def _logits(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Logits predicting tokens 1…T−1, [B, T−1, V], at least float32."""
        return at_least_float32(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1])

    def token_loss(self, model: torch.nn.Module, batch: Batch, sample: torch.Generator | None = None) -> torch.Tensor:
        """Loss of each predicted token, [B, T−1] (entry t is token t+1's loss; zero off target)."""
        logits = self._logits(model, batch)
        B, T, V = logits.shape
        targets = batch["input_ids"][:, 1:]
        if sample is not None:
            with torch.no_grad():
                probs = logits.softmax(-1).reshape(-1, V).cpu()
                targets = torch.multinomial(probs, 1, generator=sample).view(B, T).to(logits.device)
        nll = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), reduction="none").view(B, T)
        return nll * batch["target_mask"][:, 1:]

    def loss(self, model: torch.nn.Module, batch: Batch, sample: torch.Generator | None = None) -> torch.Tensor:
        return self.token_loss(model, batch, sample).sum(1)

    def log_odds(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """log p/(1−p) of the target tokens, p their joint probability (TRAK's output for LMs)."""
        return log_odds_from_nll(self.loss(model, batch))

    def check(self, examples: list[TokenExample]) -> dict[str, int]:
        return {
            f"were longer than the context ({self.max_length} tokens) and were truncated": sum(e.truncated for e in examples),
            "have no target tokens (zero gradient)": sum(not any(e.target_mask[1:]) for e in examples),
        }

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


def warn_encoding_problems(task: Task, counts: dict[str, int], total: int) -> None:
    """One warning per kind of encoding problem seen in `total` examples (counts from `task.check`)."""
    import warnings

    for what, n in counts.items():
        if n:
            warnings.warn(f"{n} of {total} examples {what}", stacklevel=3)
