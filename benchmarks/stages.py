"""Stage attribution against retraining with each stage skipped, over several seeds.

A tiny GPT-2 trained in four stages ("pretrain", "sft", "inject" plants a behaviour, "repair"
partly undoes it; the world and data of `headwater demo stages`), in two settings:

- trainer: the Hugging Face Trainer, a fresh optimizer per stage (AdamW, SGD with Nesterov
  momentum; linear, cosine, constant schedules), recorded by the TrajectoryRecorder callback;
- persistent: one SGD optimizer (momentum 0.9, coupled weight decay) across all four stages in a
  plain loop, each stage with its own learning rate: the momentum buffer and the decay carry each
  stage's gap into the next, which only the propagated and curvature estimators model.

and fine-tuning stages of a pre-trained model (the pretraining sentences and half the
question/answer pairs, AdamW, not recorded: the run's θ_0, as a user's base checkpoint):

- finetune ×s: four stages ("sft" the other half of the pairs, "inject", "repair", "polish" all
  the pairs again) with one SGD optimizer as in persistent, each stage its own schedule (warm-up
  and cosine, constant, step, linear decay) and learning rates scaled by s = 1, 0.3, 0.1: how the
  estimators fare as the stages shrink from moving a behaviour by several nats to a fraction of one;
- finetune-trainer ×s: the same stages through the Trainer, a fresh optimizer each (AdamW with
  warm-up and cosine, SGD with Nesterov momentum, AdamW with decay 0.1, SGD with momentum and
  linear decay), learning rates scaled likewise.

For every seed, stage and behaviour the true effect is f(θ_T) − f(θ_T with the stage skipped),
by retraining the later stages as recorded; and the same with only 1% of the stage taken out
(θ_end − 0.01·Δ, the moments likewise), the local question, where first-order estimates are
exact in the limit. Both runs are recorded with a checkpoint every step; the estimators run on
that recording and on the same recording with only the stage boundaries (the default), there
with the path between boundaries interpolated (the default) or replayed over the recorded
batches (`curvature_path="replayed"`). Prints,
per setting, removed fraction and estimator, the Pearson and Spearman correlation with the truth
over stages × behaviours (pooled over seeds, and the mean of the per-seed values), sign
agreement, how often the stage with the largest effect is named, and the error over the stages
before the last.

    python benchmarks/stages.py                # 5 seeds × 8 settings, ~9 min on 2 cores
    python benchmarks/stages.py --seeds 2      # quicker
    python benchmarks/stages.py --summarise    # the tables again from results/stages.json, no training

Beside the estimators, the skipping tables carry a reference: retraining with 1% out, scaled to
the whole stage (what an estimate exact to first order would say).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from headwater import StageAttribution, StageConfig, Trajectory, TrajectoryRecorder
from headwater.demos import stages as demo

REMOVED = (1.0, 0.01)
ESTIMATORS = {  # name: (which recording, curvature matrix, path); naive and propagated come with each
    "curvature": ("boundaries", "gauss-newton", "interpolated"),  # the default
    "curvature, Hessian": ("boundaries", "hessian", "interpolated"),
    "curvature, Hessian, checkpoint every step": ("every", "hessian", "interpolated"),
    "curvature, replayed path": ("boundaries", "gauss-newton", "replayed"),
    "curvature, Hessian, replayed path": ("boundaries", "hessian", "replayed"),
    "curvature, EK-FAC per stage": ("boundaries", "ekfac", "interpolated"),  # the at-scale form
}

# Not an estimator: the local question's true answer (retraining with 1% out) scaled to the whole
# stage, i.e. an estimate exact to first order. How well it predicts skipping is what any
# first-order estimator, however exact its propagation, can hope for.
LOCAL = "retraining with 1% out, × 100 (exact to first order)"

# stage: (learning rate, epochs, schedule over the stage's steps: fraction done -> multiplier)
constant = lambda x: 1.0  # noqa: E731
PERSISTENT = {"pretrain": (0.03, 3, constant), "sft": (0.01, 3, constant), "inject": (0.01, 2, constant), "repair": (0.005, 2, constant)}
FINETUNE = {
    "sft": (0.01, 2, lambda x: min(1.0, x / 0.1) * 0.5 * (1 + np.cos(np.pi * x))),  # warm-up, cosine
    "inject": (0.01, 2, constant),
    "repair": (0.005, 2, lambda x: 1.0 if x < 0.5 else 0.3),  # a step schedule
    "polish": (0.005, 2, lambda x: 1.0 - x),  # linear decay
}
FINETUNE_SCALES = (1.0, 0.3, 0.1)


def persistent_run(path: Path, model, task, stages: dict, plan: dict, seed: int, scale: float = 1.0, checkpoint_every: int | None = 1) -> None:
    """The stages of `plan` with one SGD optimizer (its momentum buffer carries across stages),
    each with its own learning rate (times `scale`) and schedule."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    recorder = TrajectoryRecorder(path, model, checkpoint_every=checkpoint_every)
    g = torch.Generator().manual_seed(seed)
    for name, (lr, epochs, schedule) in plan.items():
        recorder.begin_stage(name, opt)
        records = stages[name]
        batches = [chosen.tolist() for _ in range(epochs) for chosen in torch.randperm(len(records), generator=g).split(8)]
        for t, chosen in enumerate(batches):
            for group in opt.param_groups:
                group["lr"] = scale * lr * schedule(t / len(batches))
            demo.backward_token_mean(model, task, [records[i] for i in chosen])
            opt.step()
            recorder.step(opt, ids=[records[i]["id"] for i in chosen])
            opt.zero_grad()
    recorder.close()


def persistent_truth(traj: Trajectory, model, task, stages: dict, behaviours: dict, removed: float) -> np.ndarray:
    """Retrain with `removed` of each stage taken out: from its end moved that fraction back to
    its start (parameters and momentum buffer), the later stages' recorded batches and learning
    rates, torch.optim.SGD's update."""
    final = demo.behaviour_values(model, task, behaviours)
    out = np.zeros((len(traj.stages), len(behaviours)))
    for k, stage in enumerate(traj.stages):
        skipped = copy.deepcopy(model)
        params = dict(skipped.named_parameters())
        start, end = traj.params_at(stage.name, False), traj.params_at(stage.name, True)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(end[n] - removed * (end[n] - start[n]))
        opt = torch.optim.SGD(skipped.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
        buf_start, buf_end = (traj.moments_at(stage.name, e).get("momentum_buffer", {}) for e in (False, True))
        for n, buf in buf_end.items():
            opt.state[params[n]]["momentum_buffer"] = buf - removed * (buf - buf_start.get(n, torch.zeros_like(buf)))
        by_id = {r["id"]: r for rs in stages.values() for r in rs}
        for later in traj.stages[k + 1 :]:
            for t in range(later.start, later.stop):
                rec = traj.steps[t]
                for group in opt.param_groups:
                    group["lr"] = rec.lr[0]
                demo.backward_token_mean(skipped, task, [by_id[i] for i in rec.ids])
                opt.step()
                opt.zero_grad()
        out[k] = final - demo.behaviour_values(skipped, task, behaviours)
    return out


def boundaries_only(traj: Trajectory, path: Path) -> Trajectory:
    """The same recording without its every-step checkpoints (stage boundaries only)."""
    if path.exists():
        shutil.rmtree(path)
    shutil.copytree(traj.path, path, ignore=shutil.ignore_patterns("checkpoints"))
    meta = json.loads((path / "trajectory.json").read_text())
    meta.pop("checkpoints", None)
    (path / "trajectory.json").write_text(json.dumps(meta))
    return Trajectory(path)


def estimates(recordings: dict, model, task, stages: dict, behaviours: dict, removed: float, seconds: dict) -> dict:
    """Every estimator's effects, [stages, behaviours] each; `seconds` gets each configuration's time (its curvature
    estimate, with the naive and propagated ones and the evaluations that come with every call)."""
    out = {}
    for name, (which, matrix, path) in ESTIMATORS.items():
        config = StageConfig(batch_loss="token-mean", curvature_matrix=matrix, curvature_path=path, removed=removed)
        t = time.time()
        effects = StageAttribution(recordings[which], model, task, config, data=stages).effects(behaviours)
        seconds[f"{name} {removed}"] = time.time() - t
        if not out:
            out.update({k: v for k, v in effects.estimates.items() if not k.startswith("curvature")})
        out.update({k.replace("curvature", name): v for k, v in effects.estimates.items() if k.startswith("curvature")})
    return out


def run_setting(setting: str, seed: int, workdir: Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    t = time.time()
    if setting == "trainer" or setting.startswith("finetune-trainer"):
        finetune = float(setting.split("×")[1]) if "×" in setting else None
        traj, model, task, stages, behaviours, plans, _ = demo.train_pipeline(workdir, seed, checkpoint_every=1, finetune=finetune)
        truth = lambda removed: demo.true_effects(traj, model, task, stages, behaviours, workdir, seed, removed, plans)  # noqa: E731
    else:
        stages, behaviours, task, model, path = demo.fresh_run(workdir, seed)
        if setting == "persistent":
            persistent_run(path, model, task, stages, PERSISTENT, seed)
        else:
            stages = demo.pretrain_base(model, task, stages, seed)
            persistent_run(path, model, task, stages, FINETUNE, seed, scale=float(setting.split("×")[1]))
        traj = Trajectory(path)
        truth = lambda removed: persistent_truth(traj, model, task, stages, behaviours, removed)  # noqa: E731
    seconds = {"training": time.time() - t}
    recordings = {"every": traj, "boundaries": boundaries_only(traj, workdir / "boundaries")}
    out = {"seconds": seconds}
    for removed in REMOVED:
        est = estimates(recordings, model, task, stages, behaviours, removed, seconds)
        t = time.time()
        true = truth(removed)
        seconds[f"retraining {removed}"] = time.time() - t
        out[str(removed)] = {"estimates": {k: v.tolist() for k, v in est.items()}, "truth": true.tolist()}
    return out


def summary(runs: list[dict], removed: float) -> dict:
    """Agreement of each estimator with the truth; effects divided by the fraction removed, so
    that the errors of the local question read per unit of the stage."""
    runs = [{"truth": np.array(r["truth"]) / removed, "estimates": {k: np.array(v) / removed for k, v in r["estimates"].items()}} for r in runs]
    out = {}
    for name in runs[0]["estimates"]:
        per_seed = [demo.agreement(r["estimates"][name], r["truth"]) for r in runs]
        pooled = demo.agreement(np.concatenate([r["estimates"][name] for r in runs]), np.concatenate([r["truth"] for r in runs]))
        pooled["top_stage"] = float(np.nanmean([s["top_stage"] for s in per_seed]))  # a run's top stage: per seed
        # Skipping the last stage leaves θ_T = θ_start(last), which every estimator gets exactly:
        # the stages before it are where estimators differ.
        before = [(r["estimates"][name][:-1], r["truth"][:-1]) for r in runs]
        earlier = demo.agreement(np.concatenate([e for e, _ in before]), np.concatenate([t for _, t in before]))
        errors = np.concatenate([(e - t).ravel() for e, t in before])
        earlier["rmse"] = float(np.sqrt(np.nanmean(errors**2)))
        out[name] = {
            "omitted": float(np.mean([np.isnan(r["estimates"][name]).mean() for r in runs])),
            "pooled": pooled,
            "before_last": earlier,
            **{f"mean_{k}": float(np.mean([s[k] for s in per_seed])) for k in per_seed[0]},
            **{f"std_{k}": float(np.std([s[k] for s in per_seed])) for k in per_seed[0]},
        }
    return out


def summaries(raw: dict) -> dict:
    """{setting: {removed: summary}}, the skipping question with the LOCAL reference beside the estimators."""
    out = {}
    for setting, runs in raw.items():
        out[setting] = {}
        for removed in REMOVED:
            rs = [run[str(removed)] for run in runs]
            if removed == 1.0:
                local = [np.array(run[str(REMOVED[1])]["truth"]) / REMOVED[1] for run in runs]
                rs = [{"truth": r["truth"], "estimates": {**r["estimates"], LOCAL: x.tolist()}} for r, x in zip(rs, local)]
            out[setting][str(removed)] = summary(rs, removed)
    return out


def table(results: dict, seeds: int) -> str:
    lines = []
    for setting, by_removed in results.items():
        for removed, s in by_removed.items():
            what = "each stage skipped" if float(removed) == 1 else f"{float(removed):.0%} of each stage taken out (effects per unit removed)"
            lines += [
                f"\n{setting}, {what}: {seeds} seeds × 4 stages × 3 behaviours.",
                "",
                "| estimator | Pearson | Spearman | sign agreement | names the top stage | stages before the last: Pearson | Spearman | sign | RMSE |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            omitted = []
            for name, m in s.items():
                if float(removed) < 1 and name.endswith("(linear)"):
                    continue  # the same as the evaluated readout this close to the run
                p, b = m["pooled"], m["before_last"]
                lines.append(
                    f"| {name} | {p['pearson']:.3f} ({m['mean_pearson']:.2f} ± {m['std_pearson']:.2f}) | "
                    f"{p['spearman']:.3f} ({m['mean_spearman']:.2f} ± {m['std_spearman']:.2f}) | {p['sign']:.2f} | {p['top_stage']:.2f} | "
                    f"{b['pearson']:.3f} | {b['spearman']:.3f} | {b['sign']:.2f} | {b['rmse']:.2f} |"
                )
                if m.get("omitted"):
                    omitted.append(f"{name} {m['omitted']:.0%}")
            if omitted:  # the figures above are over the rest: say how much that is
                lines += ["", "Omitted as diverged (NaN), share of stages × behaviours: " + ", ".join(omitted) + "."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    finetune = [f"finetune{kind} ×{x:g}" for kind in ("", "-trainer") for x in FINETUNE_SCALES]
    p.add_argument("--settings", nargs="+", default=["trainer", "persistent", *finetune], choices=["trainer", "persistent", *finetune])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/headwater-bench-stages"))
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "stages.json")
    p.add_argument("--summarise", action="store_true", help="rebuild the tables of --out from the runs it holds (no training)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    if args.summarise:
        saved = json.loads(args.out.read_text())
        raw, meta = saved["runs"], saved["args"]
    else:
        raw = {
            setting: [run_setting(setting, seed, args.workdir / setting.replace(" ×", "-") / str(seed)) for seed in range(args.seeds)]
            for setting in args.settings
        }
        meta = {k: str(v) for k, v in vars(args).items()}
    results = summaries(raw)
    text = table(results, len(next(iter(raw.values()))))
    print(text)
    print(f"\ntotal {time.time() - t0:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": meta, "summary": results, "runs": raw, "table": text}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
