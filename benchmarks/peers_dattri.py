"""dattri scores of a task: gradient cosine, TracIn, IF with CG and EK-FAC, TRAK (see peers_driver.py)."""

from __future__ import annotations

from pathlib import Path

from peers_task import NotRun, Task, lm_token_losses


def run_dattri(task: Task, record, workdir: Path, args) -> None:
    import dattri.algorithm.tracin as dattri_tracin
    import dattri.algorithm.trak as dattri_trak
    import torch
    import torch.nn.functional as F
    from dattri.task import AttributionTask
    from torch.func import functional_call
    from torch.utils.data import DataLoader, TensorDataset

    # dattri's attributors do `self.projector_kwargs = DEFAULT_PROJECTOR_KWARGS; .update(projector_kwargs)`,
    # editing the module-level defaults in place: restore them before each method
    pristine = {m: dict(m.DEFAULT_PROJECTOR_KWARGS) for m in (dattri_tracin, dattri_trak)}

    def fresh_defaults():
        for m, d in pristine.items():
            m.DEFAULT_PROJECTOR_KWARGS.clear()
            m.DEFAULT_PROJECTOR_KWARGS.update(d)

    PROJ_KEYS = {"proj_dim", "proj_max_batch_size", "proj_seed", "proj_type"}

    def split(name):
        """--set overrides for one method: (constructor kwargs, projector kwargs or None, all)."""
        fresh_defaults()
        over = args.overrides(name)
        proj = {k: v for k, v in over.items() if k in PROJ_KEYS}
        return {k: v for k, v in over.items() if k not in PROJ_KEYS}, (proj or None), over

    lm = task.kind == "lm"
    sample_ndim = task.train[0].dim() - 1  # dims of one example, without the batch dimension

    def as_batch(t):
        # IF attributors hand the loss a dummy leading (batch) dimension, TracIn/TRAK do not
        # (dattri docs/guide/data_compatibility.md, "Definition of loss/target function")
        return t if t.dim() == sample_ndim + 1 else t.unsqueeze(0)

    def loss_factory(model):
        if lm:

            def f(params, data):
                ids, att, tm = (as_batch(d) for d in data)
                logits = functional_call(model, params, (ids,), {"attention_mask": att}).logits
                return lm_token_losses(logits, ids, tm).mean()

        else:

            def f(params, data):
                x, y = data
                x = as_batch(x)
                y = y if y.dim() == 1 else y.unsqueeze(0)
                return F.cross_entropy(functional_call(model, params, (x,)), y)  # mean, as training

        return f

    def margin_factory(model):
        # TRAK's model output: log(p/(1-p)) of the correct class, written as in dattri's
        # examples/noisy_label_detection/trak_noisy_label.py (there as logp - log(1 - exp(logp)));
        # here as logit_y - logsumexp(other logits), the same function without the overflow
        def f(params, data):
            x, y = data
            logits = functional_call(model, params, (as_batch(x),))[0]
            is_y = torch.arange(logits.shape[-1]) == y  # (no data-dependent indexing under vmap)
            return (logits * is_y).sum() - torch.logsumexp(logits.masked_fill(is_y, -torch.inf), dim=-1)

        def m(params, data):
            x, y = data
            logits = functional_call(model, params, (as_batch(x),))[0]
            is_y = torch.arange(logits.shape[-1]) == y
            return (torch.softmax(logits, dim=-1) * is_y).sum()

        return f, m

    train_ds, target_ds = TensorDataset(*task.train), TensorDataset(*task.targets)
    bs = 8 if lm else 32

    def loader(ds, b):
        return DataLoader(ds, batch_size=b, shuffle=False)

    def attribute(attr, whole_train_batch: bool):
        with torch.no_grad():
            s = attr.attribute(loader(train_ds, task.n if whole_train_batch else bs), loader(target_ds, task.q))
        return s.double().cpu().numpy().T  # dattri returns [n_train, n_test]

    projector_note = "projector_kwargs default {'proj_dim': 512, 'proj_max_batch_size': 32, 'proj_seed': 0, 'device': 'cpu'} (dattri/algorithm/{tracin,trak}.py DEFAULT_PROJECTOR_KWARGS), random_project proj_type default 'normal' (dattri/func/projection.py)"

    # --- gradient cosine: TracIn with normalized gradients, weight 1, one checkpoint (the final model)
    def grad_cos():
        from dattri.algorithm import TracInAttributor

        model = task.fresh()
        t = AttributionTask(loss_func=loss_factory(model), model=model, checkpoints=[task.state_any(task.ensemble[0])])
        kw, proj, over = split("dattri__grad_cos")
        attr = TracInAttributor(task=t, weight_list=torch.ones(1), normalized_grad=True, device="cpu", projector_kwargs=proj, **kw)
        s = attribute(attr, False)
        return s, {
            "api": "TracInAttributor(weight_list=ones(1), normalized_grad=True) on ensemble[0] (the docstring's 'Grad-Cos' recipe)",
            "projector": projector_note,
            "loss": "mean cross-entropy" if not lm else "summed target-token cross-entropy",
            "overrides (non-default)": over,
            "sign": "cosine of train and target loss gradients: positive = helpful; no flip",
        }

    record("dattri__grad_cos", grad_cos)

    # --- TracIn over the checkpoints, each weighted by lr * steps it stands for
    def tracin():
        from dattri.algorithm import TracInAttributor

        if not task.checkpoints:
            raise ValueError("task.json lists no checkpoints")
        model = task.fresh()
        states = [task.state_any(c["path"]) for c in task.checkpoints]
        w = torch.tensor([float(c["lr"]) * float(c.get("steps", 1)) for c in task.checkpoints])
        t = AttributionTask(loss_func=loss_factory(model), model=model, checkpoints=states)
        kw, proj, over = split("dattri__tracin")
        attr = TracInAttributor(task=t, weight_list=w, normalized_grad=False, device="cpu", projector_kwargs=proj, **kw)
        s = attribute(attr, False)
        return s, {
            "api": "TracInAttributor(weight_list=lr*steps per checkpoint, normalized_grad=False)",
            "checkpoints": len(states),
            "weight_list": w.tolist(),
            "weight_note": "dattri's docstring: weight_list 'will contain a list of learning rates at each ckpt'; here lr x steps the checkpoint stands for (TracInCP's step-size sum over the interval), as headwater's TracIn in lds.py",
            "projector": projector_note,
            "overrides (non-default)": over,
            "sign": "sum_k w_k g_train . g_target: positive = helpful; no flip",
        }

    record("dattri__tracin", tracin)

    # --- influence function, conjugate gradient
    def if_cg():
        from dattri.algorithm import IFAttributorCG

        model = task.fresh()
        t = AttributionTask(loss_func=loss_factory(model), model=model, checkpoints=task.state_any(task.ensemble[0]))
        kw, _, over = split("dattri__if_cg")
        attr = IFAttributorCG(task=t, device="cpu", **kw)  # defaults: max_iter=10, tol=1e-7, mode='rev-rev', regularization=0.0
        attr.cache(loader(train_ds, task.n))  # docstring: full-batch loader for the best accuracy
        s = attribute(attr, True)
        kw = attr.transformation_kwargs
        return s, {
            "api": "IFAttributorCG(task).cache(full train set as one batch).attribute(train, targets)",
            "max_iter": kw["max_iter"],
            "tol": kw["tol"],
            "mode": kw["mode"],
            "regularization": kw["regularization"],
            "defaults_source": "dattri/algorithm/influence_function.py IFAttributorCG.__init__: max_iter 10, tol 1e-7, mode 'rev-rev', regularization 0.0 (README's example passes regularization=1e-2, not a default)",
            "hessian": "Hessian of the mean training loss over all n_train examples (one batch)",
            "cg_note": "dattri 0.3.0's CG ignores tol (vmap) and always runs max_iter steps from x0 = v; past convergence it divides 0/0 (NaN), so max_iter must stay below the parameter count",
            "overrides (non-default)": over,
            "sign": "g_train^T H^-1 g_target: positive = helpful; no flip",
        }

    record("dattri__if_cg", if_cg)

    # --- influence function, EK-FAC (dattri: linear modules only, empirical Fisher of the loss)
    def if_ekfac():
        from dattri.algorithm import IFAttributorEKFAC

        if lm:
            raise NotRun("not run for kind 'lm' (dattri's EK-FAC needs nn.Linear modules; GPT-2 uses Conv1D)")
        model = task.fresh()
        t = AttributionTask(loss_func=loss_factory(model), model=model, checkpoints=task.state_any(task.ensemble[0]))
        kw, _, over = split("dattri__if_ekfac")
        attr = IFAttributorEKFAC(task=t, device="cpu", **kw)  # defaults: module_name=None -> every nn.Linear, damping=0.0
        attr.cache(loader(train_ds, bs))  # max_iter default: every batch
        s = attribute(attr, True)
        return s, {
            "api": "IFAttributorEKFAC(task).cache(train loader).attribute(train, targets)",
            "damping": attr.damping,
            "modules": attr.module_name,
            "defaults_source": "dattri/algorithm/influence_function.py IFAttributorEKFAC: module_name None = all nn.Linear (conv layers are not covered), damping 0.0; cache max_iter None = all batches",
            "fisher": "estimated on the task's loss with the true labels (empirical Fisher), as dattri does",
            "cache_batch_size": bs,
            "overrides (non-default)": over,
            "sign": "g_train^T F^-1 g_target: positive = helpful; no flip",
        }

    record("dattri__if_ekfac", if_ekfac)

    # --- TRAK
    def trak(paths, name):
        from dattri.algorithm import TRAKAttributor

        if lm:
            raise NotRun("not run for kind 'lm' (TRAK's margin/correct-probability functions are classification ones)")
        model = task.fresh()
        f, m = margin_factory(model)
        t = AttributionTask(loss_func=f, model=model, checkpoints=[task.state_any(p) for p in paths])
        kw, proj, over = split(name)
        attr = TRAKAttributor(
            task=t, correct_probability_func=m, device="cpu", projector_kwargs=proj, **kw
        )  # defaults: proj_dim 512, regularization 0.0
        attr.cache(loader(train_ds, bs))
        with torch.no_grad():
            s = attr.attribute(loader(target_ds, task.q))
        return s.double().cpu().numpy().T, {
            "api": "TRAKAttributor(task(loss_func=margin), correct_probability_func=p_correct).cache(train).attribute(targets)",
            "models": len(paths),
            "seconds_note": "training the extra ensemble models is not included" if len(paths) > 1 else "",
            "regularization": attr.regularization,
            "projector": projector_note,
            "defaults_source": "dattri/algorithm/trak.py TRAKAttributor.__init__: projector_kwargs None -> DEFAULT_PROJECTOR_KWARGS (proj_dim 512), regularization 0.0",
            "proj_dim": attr.projector_kwargs["proj_dim"],
            "note": f"n_train={task.n} < proj_dim={attr.projector_kwargs['proj_dim']}: X^T X is rank-deficient"
            if task.n < attr.projector_kwargs["proj_dim"]
            else "",
            "overrides (non-default)": over,
            "sign": "TRAK scores: positive = raises the target's margin = lowers its loss (helpful); no flip",
        }

    record("dattri__trak_1", lambda: trak(task.ensemble[:1], "dattri__trak_1"))
    record("dattri__trak_ensemble", lambda: trak(task.ensemble, "dattri__trak_ensemble"))
