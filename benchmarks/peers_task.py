"""The task directory written by lds_peers.py, loaded for the peers' drivers (runs in the peers' virtualenv)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


class NotRun(Exception):
    """A peer method that does not apply to the task's kind (recorded as its error, never run)."""


class Task:
    """task.json + data.safetensors + the models, loaded on CPU."""

    def __init__(self, task_dir: Path):
        import torch
        from safetensors.torch import load_file

        self.dir = task_dir
        self.meta = json.loads((task_dir / "task.json").read_text())
        self.kind = self.meta.get("kind", "classification")
        self.data = load_file(str(task_dir / "data.safetensors"))
        if self.kind == "classification":
            self.train = (self.data["train_x"].float(), self.data["train_y"].long())
            self.targets = (self.data["target_x"].float(), self.data["target_y"].long())
        else:
            keys = ("input_ids", "attention_mask", "target_mask")
            self.train = tuple(self.data[f"train_{k}"] for k in keys)
            self.targets = tuple(self.data[f"target_{k}"] for k in keys)
            self.train = (self.train[0].long(), self.train[1].long(), self.train[2].bool())
            self.targets = (self.targets[0].long(), self.targets[1].long(), self.targets[2].bool())
        self.n = int(self.train[0].shape[0])
        self.q = int(self.targets[0].shape[0])
        self.ensemble = list(self.meta["ensemble"])
        self.checkpoints = list(self.meta.get("checkpoints") or [])
        self._models_module = None
        self.torch = torch

    # classification models
    def models_module(self):
        if self._models_module is None:
            if "lds_models" in sys.modules:
                self._models_module = sys.modules["lds_models"]
            else:
                spec = importlib.util.spec_from_file_location("lds_models", HERE / "lds_models.py")
                mod = importlib.util.module_from_spec(spec)
                sys.modules["lds_models"] = mod
                spec.loader.exec_module(mod)
                self._models_module = mod
        return self._models_module

    def state(self, rel: str) -> dict:
        from safetensors.torch import load_file

        return load_file(str(self.dir / rel))

    def fresh(self):
        """An (untrained) model of the task's architecture, in eval mode."""
        if self.kind == "classification":
            return self.models_module().build(self.meta["model"]).eval()
        return self.lm(self.ensemble[0])

    def model(self, rel: str):
        if self.kind == "classification":
            m = self.fresh()
            m.load_state_dict(self.state(rel))
            return m.eval()
        return self.lm(rel)

    def lm(self, rel: str):
        from transformers import GPT2LMHeadModel

        m = GPT2LMHeadModel.from_pretrained(str(self.dir / rel), attn_implementation="eager")
        m.config.use_cache = False
        return m.float().eval()

    def state_any(self, rel: str) -> dict:
        """The state dict of a model file (classification) or HF folder (lm)."""
        if self.kind == "classification":
            return self.state(rel)
        return {k: v.detach().clone() for k, v in self.lm(rel).state_dict().items()}


def lm_token_losses(logits, ids, mask):
    """Per-example summed cross-entropy over positions t >= 1 with mask[t]: [B]."""
    import torch.nn.functional as F

    logits = logits[:, :-1]
    labels, m = ids[:, 1:], mask[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none").view(labels.shape)
    return (ce * m.to(ce.dtype)).sum(1)


def conv1d_to_linear(model):
    """GPT-2's transformers.pytorch_utils.Conv1D layers as nn.Linear (same function), because
    Kronfluence tracks only nn.Linear / nn.Conv2d (its DOCUMENTATION.md FAQ: "What should I do if my
    model does not have any nn.Linear or nn.Conv2d modules?" -> rewrite the model with supported modules)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    for _name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, Conv1D):
                nx, nf = child.weight.shape
                lin = torch.nn.Linear(nx, nf, bias=child.bias is not None)
                with torch.no_grad():
                    lin.weight.copy_(child.weight.T)
                    if child.bias is not None:
                        lin.bias.copy_(child.bias)
                setattr(mod, child_name, lin)
    return model
