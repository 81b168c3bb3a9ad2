"""What the stage estimators cost as runs get longer, and what the at-scale one gives up.

The fine-tuning pipeline of `benchmarks/stages.py` (a pre-trained tiny GPT-2, four stages under
one persistent SGD optimizer, each its own schedule; learning rates × 0.3), run with each stage's
epochs multiplied by m and its learning rate divided by m: the same movement in m times the
steps, as a longer run takes. Recorded with stage boundaries only (no checkpoints inside stages). For each m: seconds of the
propagated estimator (first order), the per-step curvature estimator (the default: a Gauss–Newton
product per later step and stage) and the EK-FAC one (`curvature_matrix="ekfac"`: one fit per
later stage and a few products per gap entering it), and each one's agreement with retraining
with the stage skipped (Pearson and Spearman over stages × behaviours, and the RMSE over the
stages before the last, in nats).

    python benchmarks/stages_cost.py                 # m = 1, 4, 16, 64
    python benchmarks/stages_cost.py --multipliers 1 4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from stages import FINETUNE, persistent_run, persistent_truth

from headwater import StageAttribution, StageConfig, Trajectory
from headwater.demos import stages as demo

ESTIMATORS = {
    "propagated (first order)": StageConfig(batch_loss="token-mean", curvature=False),
    "curvature, per step": StageConfig(batch_loss="token-mean"),
    "curvature, EK-FAC per stage": StageConfig(batch_loss="token-mean", curvature_matrix="ekfac"),
}


def run(multiplier: int, seed: int, workdir: Path) -> dict:
    stages, behaviours, task, model, path = demo.fresh_run(workdir, seed)
    stages = demo.pretrain_base(model, task, stages, seed)
    plan = {name: (lr / multiplier, epochs * multiplier, schedule) for name, (lr, epochs, schedule) in FINETUNE.items()}
    persistent_run(path, model, task, stages, plan, seed, scale=0.3, checkpoint_every=None)
    traj = Trajectory(path)
    truth = persistent_truth(traj, model, task, stages, behaviours, 1.0)
    out = {"steps": len(traj.steps), "estimators": {}}
    for name, config in ESTIMATORS.items():
        t = time.time()
        effects = StageAttribution(traj, model, task, config, data=stages).effects(behaviours)
        seconds = time.time() - t
        key = "curvature" if "curvature" in name else "propagated"
        est = effects.estimates[key]
        agreement = demo.agreement(est, truth)
        rmse = float(np.sqrt(np.nanmean((est[:-1] - truth[:-1]) ** 2)))
        out["estimators"][name] = {"seconds": seconds, "pearson": agreement["pearson"], "spearman": agreement["spearman"], "rmse": rmse}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--multipliers", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/headwater-bench-stages-cost"))
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "stages_cost.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = {m: run(m, args.seed, args.workdir / str(m)) for m in args.multipliers}
    lines = ["| steps | estimator | seconds | × EK-FAC's time | Pearson | Spearman | RMSE before the last stage |", "|---|---|---|---|---|---|---|"]
    for r in results.values():
        base = r["estimators"]["curvature, EK-FAC per stage"]["seconds"]
        for name, e in r["estimators"].items():
            lines.append(
                f"| {r['steps']} | {name} | {e['seconds']:.1f} | {e['seconds'] / base:.1f} | {e['pearson']:.3f} | {e['spearman']:.3f} | {e['rmse']:.2f} |"
            )
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results, "table": text}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
