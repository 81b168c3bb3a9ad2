"""Loading models to attribute: causal LMs from a local path or hub id (the real loading code,
exercised in tests on tiny models saved locally)."""

from __future__ import annotations

from .errors import UserError


def load_model(name: str, device: str = "cpu"):
    """(model, tokenizer) for a causal LM from a local path or hub id, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name)
    except Exception as exc:
        raise UserError(f"could not load model {name!r}: {' '.join(str(exc).split())}") from exc
    return model.to(device).eval(), tokenizer
