"""Loading models to attribute: causal LMs from a local path or hub id (the real loading code,
exercised in tests on tiny models saved locally)."""

from __future__ import annotations

import torch

from .errors import UserError


def load_model(name: str, device: str = "cpu", dtype: str = "auto"):
    """(model, tokenizer) for a causal LM from a local path or hub id, in eval mode, in precision
    `dtype` (auto: the checkpoint's own, float32, bfloat16 or float16)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype if dtype == "auto" else getattr(torch, dtype))
    except Exception as exc:
        raise UserError(f"could not load model {name!r}: {' '.join(str(exc).split())}") from exc
    return model.to(device).eval(), tokenizer
