"""Kronfluence EK-FAC and KFAC scores of a task (see peers_driver.py)."""

from __future__ import annotations

from pathlib import Path

from peers_task import Task, conv1d_to_linear, lm_token_losses


def run_kronfluence(task: Task, record, workdir: Path, args) -> None:
    import torch
    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task as KTask
    from torch.utils.data import TensorDataset

    lm = task.kind == "lm"

    class ClassificationTask(KTask):
        # Kronfluence's examples (examples/cifar/analyze.py, examples/uci/...) use reduction="sum"
        # for compute_train_loss; sample=True draws labels from the model (true Fisher, the default).
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(F.softmax(logits.detach(), dim=-1), num_samples=1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch  # f(theta) = the target's loss (what the benchmark attributes)
            return F.cross_entropy(model(x), y, reduction="sum")

    class LanguageModelTask(KTask):
        # as examples/wikitext/analyze.py (summed token cross-entropy; sampled labels for the true
        # Fisher), restricted to the positions whose prediction counts (target_mask)
        def compute_train_loss(self, batch, model, sample=False):
            ids, att, tm = batch
            logits = model(input_ids=ids, attention_mask=att).logits
            if not sample:
                return lm_token_losses(logits, ids, tm).sum()
            lg = logits[:, :-1]
            with torch.no_grad():
                sampled = torch.multinomial(F.softmax(lg.detach().reshape(-1, lg.shape[-1]), dim=-1), 1).view(lg.shape[:-1])
            ce = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), sampled.reshape(-1), reduction="none").view(sampled.shape)
            return (ce * tm[:, 1:].to(ce.dtype)).sum()

        def compute_measurement(self, batch, model):
            ids, att, tm = batch
            return lm_token_losses(model(input_ids=ids, attention_mask=att).logits, ids, tm).sum()

        def get_attention_mask(self, batch):
            return batch[1]

    ktask = LanguageModelTask() if lm else ClassificationTask()
    train_ds, target_ds = TensorDataset(*task.train), TensorDataset(*task.targets)
    bs = 8 if lm else 64

    for strategy in ("ekfac", "kfac"):
        name = f"kronfluence__{strategy}"

        def go(strategy=strategy):
            torch.manual_seed(0)  # the true-Fisher label sampling
            model = task.model(task.ensemble[0])
            if lm:
                model = conv1d_to_linear(model)
            model = prepare_model(model=model, task=ktask)
            out = workdir / f"kronfluence_{strategy}"
            analyzer = Analyzer(analysis_name=strategy, model=model, task=ktask, cpu=True, disable_tqdm=True, output_dir=str(out))
            over = args.overrides(name)
            fields_f = set(FactorArguments.__dataclass_fields__)
            factor_args = FactorArguments(strategy=strategy, **{k: v for k, v in over.items() if k in fields_f})  # every other field: its default
            analyzer.fit_all_factors(
                factors_name=strategy, dataset=train_ds, per_device_batch_size=bs, factor_args=factor_args, overwrite_output_dir=True
            )
            unknown = set(over) - fields_f - set(ScoreArguments.__dataclass_fields__)
            if unknown:
                raise ValueError(f"--set: not a FactorArguments/ScoreArguments field: {sorted(unknown)}")
            score_args = ScoreArguments(**{k: v for k, v in over.items() if k in ScoreArguments.__dataclass_fields__})
            analyzer.compute_pairwise_scores(
                scores_name=strategy,
                factors_name=strategy,
                query_dataset=target_ds,
                train_dataset=train_ds,
                per_device_query_batch_size=min(task.q, bs),
                per_device_train_batch_size=bs,
                score_args=score_args,
                overwrite_output_dir=True,
            )
            scores = analyzer.load_pairwise_scores(scores_name=strategy)  # compute_... returns None
            s = scores["all_modules"].double().numpy()  # [n_targets, n_train]
            fa = factor_args.to_str_dict()
            settings = {
                "strategy": strategy,
                "factor_args": {
                    k: fa[k]
                    for k in (
                        "strategy",
                        "use_empirical_fisher",
                        "covariance_max_examples",
                        "lambda_max_examples",
                        "eigendecomposition_dtype",
                        "activation_covariance_dtype",
                        "per_sample_gradient_dtype",
                        "amp_dtype",
                    )
                },
                "damping_factor": score_args.damping_factor,
                "damping_note": "ScoreArguments.damping_factor default is 1e-08 (kronfluence/arguments.py; DOCUMENTATION.md's "
                "ScoreArguments listing shows damping_factor=1e-08; None switches to the heuristic 0.1 x mean eigenvalue: "
                "--set kronfluence.damping_factor=null)",
                "overrides (non-default)": over,
                "score_args_other": "all defaults (score_dtype float32, no query low-rank, no per-module/per-token scores)",
                "tracked_modules": "Task.get_influence_tracked_modules() -> None = every nn.Linear / nn.Conv2d (task.py default)"
                + ("; GPT-2 Conv1D layers rewritten as nn.Linear (DOCUMENTATION.md FAQ), lm_head (tied to wte) included" if lm else ""),
                "train_loss": "sum over the batch (as kronfluence's examples); sample=True draws labels from the model's softmax (true Fisher, use_empirical_fisher=False default)"
                + ("; summed over target_mask tokens" if lm else ""),
                "measurement": "the target's loss, summed over the batch" + (" (summed target-token cross-entropy)" if lm else " (cross-entropy)"),
                "per_device_batch_size": bs,
                "batch_size_note": "set explicitly only to skip kronfluence's OOM batch-size search; does not change the result",
                "device": "cpu (Analyzer(cpu=True))",
                "sign": "kronfluence scores = g_target^T (G+damping)^-1 g_train: positive = helpful (lowers the target's loss); no flip",
            }
            return s, settings

        record(name, go)
