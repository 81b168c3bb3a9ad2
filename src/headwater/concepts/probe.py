"""Probes: a concept direction from labelled texts, in the raw activation space.

    concept = train_probe(model, task, positive, negative, layer=6)   # -> ConceptVector

Each record's activation at the layer is averaged over its response tokens. `logistic` fits
scikit-learn's logistic regression on standardised activations and folds the scaler back in
(v = w/σ, b = b₀ − Σ wμ/σ), so vᵀh + b on raw activations is exactly the fitted logit; `mean-diff`
takes the difference of the class means, thresholded at their midpoint. Accuracy is measured on a
held-out share of the records and saved with the direction.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from ..architecture import Site, forward_until, layer_site, target_mean
from ..errors import UserError
from ..task import Task, at_least_float32, collated_batches, whole_examples
from .vector import ConceptVector


def mean_activations(model: torch.nn.Module, task: Task, records, site: Site, batch_size: int = 16, progress: bool = False) -> torch.Tensor:
    """Each record's activation at `site` averaged over its response (target) tokens, [n, d]
    (float32, float64 for a float64 model); the forward pass stops at the site."""
    examples = whole_examples(task, records)
    out = []
    bar = tqdm(total=len(examples), desc="activations", unit="rec", disable=not progress)
    with torch.no_grad():
        for batch in collated_batches(task, examples, batch_size):
            h = forward_until(model, site, lambda: task.loss(model, batch))
            out.append(at_least_float32(target_mean(h, batch.get("target_mask"))).cpu())
            bar.update(len(h))
    bar.close()
    return torch.cat(out)


def fit_direction(x: np.ndarray, y: np.ndarray, kind: str = "logistic", test_fraction: float = 0.25, seed: int = 0, regularization: float = 1.0):
    """(v [d], b, info) separating activations x [n, d] with labels y [n] (True = the concept);
    `info` has the held-out accuracy and the split sizes. vᵀx + b > 0 predicts the concept."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y).astype(bool)
    if y.all() or not y.any():
        raise UserError("a probe needs records of both classes (positive and negative)")
    if min(y.sum(), (~y).sum()) < 2:
        raise UserError("a probe needs at least two records of each class (one to fit, one to test)")
    x_fit, x_test, y_fit, y_test = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    if kind == "logistic":
        scaler = StandardScaler().fit(x_fit)
        clf = LogisticRegression(C=regularization, max_iter=5000).fit(scaler.transform(x_fit), y_fit)
        w = clf.coef_[0] / scaler.scale_
        v, b = w, float(clf.intercept_[0] - w @ scaler.mean_)
    elif kind == "mean-diff":
        mu_pos, mu_neg = x_fit[y_fit].mean(0), x_fit[~y_fit].mean(0)
        v = mu_pos - mu_neg
        b = float(-v @ (mu_pos + mu_neg) / 2)
    else:
        raise UserError(f"unknown probe kind {kind!r}; logistic or mean-diff")
    accuracy = float(((x_test @ v + b > 0) == y_test).mean())
    info = {"accuracy": accuracy, "fit_records": len(y_fit), "test_records": len(y_test), "positive": int(y.sum()), "negative": int((~y).sum())}
    return torch.from_numpy(v), b, info


def train_probe(
    model: torch.nn.Module,
    task: Task,
    positive,
    negative,
    layer: int | str = -1,
    kind: str = "logistic",
    test_fraction: float = 0.25,
    seed: int = 0,
    regularization: float = 1.0,
    name: str = "concept",
    batch_size: int = 16,
    progress: bool = False,
) -> ConceptVector:
    """A concept direction at `layer` (block number: the residual stream after it; or a module
    name) separating `positive` from `negative` records."""
    site = layer_site(model, layer)
    pos = mean_activations(model, task, positive, site, batch_size, progress)
    neg = mean_activations(model, task, negative, site, batch_size, progress)
    x = torch.cat([pos, neg]).numpy()
    y = np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]
    v, b, info = fit_direction(x, y, kind, test_fraction, seed, regularization)
    info |= {"layer": str(layer), "pooling": "mean over response tokens"}
    return ConceptVector(v, site, kind, b, name, info)
