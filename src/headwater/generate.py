"""The model's own responses: greedy or sampled completions of prompts, batched, reproducible.

Prompts are grouped by token length so that no batch needs padding (decoder-only models would
otherwise need left padding and position ids to match); sampling draws from a forked RNG seeded
by `seed`, so the caller's random state is left alone.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import UserError


def completions(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 32,
    sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = False,
) -> list[str]:
    """The model's completion of each prompt (text after the prompt, stopped at end-of-sequence
    or at the model's context length)."""
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if any(not ids for ids in encoded):
        raise UserError("cannot complete an empty prompt")
    groups: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(encoded):
        groups[len(ids)].append(i)
    out: list[str] = [""] * len(prompts)
    context = context_length(model)
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    bar = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for length, members in sorted(groups.items()):
            room = min(max_new_tokens, context - length) if context else max_new_tokens
            if room < 1:  # the prompt fills the context: nothing can follow it
                bar.update(len(members))
                continue
            for lo in range(0, len(members), batch_size):
                idx = members[lo : lo + batch_size]
                ids = torch.tensor([encoded[i] for i in idx], device=device)
                new = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=room,
                    do_sample=sample,
                    temperature=temperature if sample else None,
                    top_k=None,
                    top_p=None,
                    pad_token_id=pad,
                    eos_token_id=eos,
                )[:, ids.shape[1] :]
                for i, row in zip(idx, new.tolist()):
                    out[i] = _continuation(tokenizer, encoded[i], row, eos)
                bar.update(len(idx))
    bar.close()
    return out


def context_length(model: torch.nn.Module) -> int | None:
    """The most positions the model takes (None when its config does not say)."""
    config = getattr(model, "config", None)
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def _continuation(tokenizer, prompt_ids: list[int], new_ids: list[int], eos: int | None) -> str:
    """The text the new tokens add to the prompt's text (up to end-of-sequence)."""
    if eos is not None and eos in new_ids:
        new_ids = new_ids[: new_ids.index(eos)]
    prompt = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    full = tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)
    return full[len(prompt) :] if full.startswith(prompt) else " " + tokenizer.decode(new_ids, skip_special_tokens=True)


class CompletionCache:
    """The model's greedy completions by prompt, kept in a JSON file keyed by the model's
    fingerprint and the generation length, so a second run generates nothing."""

    def __init__(self, path: str | Path | None, model_key: str, max_new_tokens: int):
        self.path = Path(path) if path else None
        self.key = f"{model_key}:{max_new_tokens}"
        self.max_new_tokens = max_new_tokens
        data = json.loads(self.path.read_text()) if self.path and self.path.exists() else {}
        self.table: dict[str, str] = data.get(self.key, {})
        self.others = {k: v for k, v in data.items() if k != self.key}

    @staticmethod
    def _h(prompt: str) -> str:
        return hashlib.sha256(prompt.encode()).hexdigest()[:24]

    def complete(self, model, tokenizer, prompts: list[str], batch_size: int = 32, progress: bool = False) -> list[str]:
        missing = sorted({p for p in prompts if self._h(p) not in self.table})
        if missing:
            for p, c in zip(missing, completions(model, tokenizer, missing, self.max_new_tokens, batch_size=batch_size, progress=progress)):
                self.table[self._h(p)] = c
            if self.path:
                tmp = self.path.with_name(f".{self.path.name}.tmp")
                tmp.write_text(json.dumps({**self.others, self.key: self.table}))
                tmp.replace(self.path)
        return [self.table[self._h(p)] for p in prompts]


def with_responses(records, model: torch.nn.Module, tokenizer, max_new_tokens: int = 32, batch_size: int = 32, progress: bool = False) -> list[dict]:
    """`records` as a list, each prompt-only record completed by the model's greedy response
    (records that have a completion, chat turns or text are kept as they are)."""
    records = [dict(records[i]) for i in range(len(records))]
    todo = [r for r in records if r.get("prompt") is not None and r.get("completion") is None and r.get("messages") is None]
    if todo:
        for r, c in zip(todo, completions(model, tokenizer, [r["prompt"] for r in todo], max_new_tokens, batch_size=batch_size, progress=progress)):
            r["completion"] = c
    return records
