"""traker TRAK scores of a task (see peers_driver.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

from peers_task import NotRun, Task


def run_traker(task: Task, record, workdir: Path, args) -> None:
    if task.kind != "classification":

        def unsupported():
            raise NotRun("traker ships no language-model output function (only image/text classification, CLIP); not run for kind 'lm'")

        for m in ("trak_1", "trak_ensemble"):
            record(f"traker__{m}", unsupported)
        return
    import logging

    import numpy as np
    import torch
    from trak import TRAKer

    x, y = task.train
    tx, ty = task.targets
    bs = 64

    def go(paths, tag):
        save = workdir / f"traker_{tag}"
        shutil.rmtree(save, ignore_errors=True)
        model = task.fresh()
        # documented defaults: proj_dim=2048, use_half_precision=True, lambda_reg=0.0, projector_seed=0,
        # FunctionalGradientComputer, BasicScoreComputer; device="cpu" -> BasicProjector with a normal
        # (Gaussian) projection, chosen by TRAKer.init_projector itself (no fast_jl / CUDA)
        over = args.overrides(f"traker__{tag}")
        traker = TRAKer(
            model=model, task="image_classification", train_set_size=task.n, save_dir=str(save), device="cpu", logging_level=logging.WARNING, **over
        )
        states = [task.state(p) for p in paths]
        for mid, st in enumerate(states):
            traker.load_checkpoint(st, model_id=mid)
            for i in range(0, task.n, bs):
                traker.featurize(batch=(x[i : i + bs], y[i : i + bs]), num_samples=min(bs, task.n - i))
        traker.finalize_features()
        proj, patched = traker.projector, False
        if getattr(proj, "num_blocks", 0) == 1 and not getattr(proj, "proj_matrix_available", True):
            # traker 0.3.2 bug (proj_dim <= 100, i.e. one block): finalize_features() frees the
            # BasicProjector's matrix and scoring the same model_id never regenerates it
            # (AttributeError 'proj_matrix'); regenerate the identical matrix from its saved state
            proj.generate_sketch_matrix(proj.generator_states[0])
            patched = True
        for mid, st in enumerate(states):
            traker.start_scoring_checkpoint(exp_name="targets", checkpoint=st, model_id=mid, num_targets=task.q)
            traker.score(batch=(tx, ty), num_samples=task.q)
        scores = traker.finalize_scores(exp_name="targets")  # [n_train, n_targets]
        s = np.asarray(scores, dtype=np.float64).T
        settings = {
            "models": len(paths),
            "task": "image_classification -> ImageClassificationModelOutput (margin log p/(1-p), Q = 1-p)",
            "proj_dim": traker.proj_dim,
            "projector": f"{type(traker.projector).__name__} ({traker.projector.proj_type}), chosen by TRAKer for device='cpu'",
            "use_half_precision": traker.dtype == torch.float16,
            "lambda_reg": traker.lambda_reg,
            "projector_seed": traker.proj_seed,
            "defaults_source": "trak/traker.py TRAKer.__init__ docstring: proj_dim 2048, use_half_precision True, lambda_reg 0.0, projector_seed 0, device 'cuda' (set to 'cpu' here)",
            "note": f"n_train={task.n} < proj_dim={traker.proj_dim}: X^T X is rank-deficient" if task.n < traker.proj_dim else "",
            "featurize_batch_size": bs,
            "seconds_note": "featurizing + scoring only; training the extra ensemble models is not included" if len(paths) > 1 else "",
            "overrides (non-default)": over,
            "sign": "TRAK scores: positive = raises the target's margin = lowers its loss (helpful); no flip",
        }
        if patched:
            settings["workaround"] = "regenerated the one-block BasicProjector matrix freed by finalize_features (traker bug for proj_dim <= 100)"
        return s, settings

    record("traker__trak_1", lambda: go(task.ensemble[:1], "trak_1"))
    record("traker__trak_ensemble", lambda: go(task.ensemble, "trak_ensemble"))
