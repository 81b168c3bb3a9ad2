"""TRAK (arXiv 2303.14186): attribution through a kernel of projected output gradients.

Per model m: Φ_m [n, k] are projected gradients of the output function f on the training records
(default: the log-odds, i.e. the classification margin or an LM target's log p/(1−p); for
regression the prediction), ψ_m [q, k] those of the query measurement, oriented so that more is
better. The kernel score is ψ_m (Φ_mᵀΦ_m + λI)⁻¹ Φ_mᵀ. Over an ensemble the kernel scores are
averaged, the reweighting Q_i = −∂L_i/∂f_i (1 − p_i for the log-odds, p_i the model's probability
of record i's target; the residual 2(y_i − f_i) for a squared-error prediction; 1 for f = −L) is
averaged separately, and the two are multiplied. For linear regression this is the exact
derivative of the query prediction with respect to up-weighting each record, up to the loss's
constant output curvature (2 for the squared error), which TRAK leaves out as it does for
classification. Positive = the training
record moves the measurement in its direction. Independently trained models help far more than
checkpoints of one run.
"""

from __future__ import annotations

import torch

from ..collect import GradientCollector
from ..config import TRAKConfig
from ..errors import UserError
from ..measurement import LogOdds, Loss, Measurement, Prediction, objective_fn
from ..task import ModuleTask, Task, collated_batches, whole_examples
from .base import Blocks, Method, query_records, record_blocks, training_data


def kernel_inverse(phi: torch.Tensor, damping: float) -> tuple[torch.Tensor, str]:
    """((ΦᵀΦ + λI)⁻¹ [k, k], "primal") or ((ΦΦᵀ + λI)⁻¹ [n, n], "dual"), whichever is smaller;
    λ = damping × the mean eigenvalue of the matrix inverted, tr(ΦᵀΦ) / min(n, k). (Over k when
    k > n, the mean counted k − n zero eigenvalues, so λ shrank as the projection grew: at the
    default damping the LM benchmark's TRAK, k = 24 n, scored LDS 0.56 instead of 0.82.)"""
    n, k = phi.shape
    lam = damping * float((phi**2).sum()) / min(n, k)
    if n >= k:
        return torch.linalg.inv(phi.T @ phi + lam * torch.eye(k, dtype=phi.dtype)), "primal"
    return torch.linalg.inv(phi @ phi.T + lam * torch.eye(n, dtype=phi.dtype)), "dual"


class TRAK(Method):
    """TRAK over an ensemble of models (one model: TRAK with M = 1).

        scores = TRAK([model_a, model_b], task).fit(train_records).score(queries)

    With an index, its records, model and task are used (TRAK computes its own output-gradient
    features: the stored rows are training-loss gradients, generally of another projection).
    """

    name = "trak"
    config_class = TRAKConfig

    def __init__(self, models: list[torch.nn.Module] | torch.nn.Module | None = None, task: Task | None = None, config: TRAKConfig | None = None):
        self.models = models if isinstance(models, (list, tuple)) or models is None else [models]
        self.task = task
        self.config = config or TRAKConfig()

    def output(self) -> Measurement:
        """The output function f on the training records."""
        kind = self.config.output
        if kind == "auto":
            kind = "prediction" if isinstance(self.task, ModuleTask) and self.task.loss_fn == "mse" else "log-odds"
        return {"loss": Loss(), "prediction": Prediction(), "log-odds": LogOdds()}[kind]

    def default_measurement(self) -> Measurement:
        return self.output()

    def fit(self, train, progress: bool = False) -> TRAK:
        self.data = training_data(train)
        index = self.data.index
        if index is not None:
            self.models = self.models or [index.model()]
            self.task = self.task if self.task is not None else index.task()
        if not self.models or self.task is None:
            raise UserError("TRAK needs its models and task= (or an index to take them from)")
        out = self.output()
        self.fitted_models = []
        for model in self.models:
            collector = GradientCollector(model, self.task, self.config.projection, self.config.modules)
            phi = -self._rows(collector, self.data.records, out).double()  # [n, k]: ∇f, f = −(the output's objective)
            inverse, form = kernel_inverse(phi, self.config.damping)
            self.fitted_models.append((collector, phi, inverse, form))
        self.reweight = sum(self._residual_weights(model, out) for model in self.models) / len(self.models)
        return self

    def _rows(self, collector: GradientCollector, records, measurement: Measurement) -> torch.Tensor:
        fn = objective_fn(measurement, self.task)
        batches = collated_batches(self.task, whole_examples(self.task, records), self.config.batch_size)
        return torch.cat([collector(b, fn) for b in batches])

    def _residual_weights(self, model: torch.nn.Module, out: Measurement) -> torch.Tensor:
        """Q_i = −∂L_i/∂f_i: 1 − p_i for the log-odds, 2(y_i − f_i) for a prediction under the
        squared error, 1 when f is the loss itself (f = −L)."""
        if isinstance(out, Loss):
            return torch.ones(len(self.data), dtype=torch.float64)
        batches = collated_batches(self.task, whole_examples(self.task, self.data.records), self.config.batch_size)
        with torch.no_grad():
            if isinstance(out, Prediction):
                return torch.cat([2 * (b[self.task.target_key].reshape(-1) - out(self.task, model, b)) for b in batches]).double()
            f = torch.cat([self.task.log_odds(model, b) for b in batches]).double()
        return torch.sigmoid(-f)

    def score_blocks(self, queries, measurement: Measurement, by: str | None = None) -> Blocks:
        self.fitted()
        records, _ = query_records(queries)
        total = 0.0
        for collector, phi, inverse, form in self.fitted_models:
            psi = -self._rows(collector, records, measurement).double()  # [q, k]: more of the measurement
            s = psi @ inverse @ phi.T if form == "primal" else psi @ phi.T @ inverse
            total = total + s.T / len(self.fitted_models)
        yield from record_blocks(total * self.reweight[:, None])
