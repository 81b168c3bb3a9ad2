"""The classification models of `lds.py`, importable by headwater and by the peers' drivers
(which run in their own virtualenv: this file needs nothing but torch).

    model = build({"name": "cnn", "side": 10, "channels": 1, "classes": 4})
"""

from __future__ import annotations

import torch
from torch import nn


def mlp(d_in: int, hidden: int, classes: int, activation: str = "tanh") -> nn.Module:
    act = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
    return nn.Sequential(nn.Linear(d_in, hidden), act(), nn.Linear(hidden, classes))


def image_mlp(side: int, channels: int, hidden: int, classes: int) -> nn.Module:
    """Images [B, C, side, side] flattened into a two-hidden-layer ReLU MLP."""
    d = channels * side * side
    return nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def cnn(side: int, channels: int, classes: int, width: int = 8) -> nn.Module:
    """Two 3×3 convolutions (the second strided), global average pooling, a linear head."""
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, classes),
    )


def cnn3(side: int, channels: int, classes: int, width: int = 6) -> nn.Module:
    """Three 3×3 convolutions with a max-pool after the second, global average pooling, a linear head."""
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, classes),
    )


BUILDERS = {"mlp": mlp, "image_mlp": image_mlp, "cnn": cnn, "cnn3": cnn3}


def build(spec: dict) -> nn.Module:
    """A freshly initialised model from its spec ({"name": ..., **keyword arguments})."""
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    return BUILDERS[spec["name"]](**kwargs)


def seeded(spec: dict, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build(spec)
