"""MAGIC on one recorded stage of a Hugging Face Trainer run, against leaving each record out.

The fine-tuning pipeline of `headwater demo stages` (a pre-trained tiny GPT-2, four stages through
the Trainer with the TrajectoryRecorder callback, learning rates × 0.3) is trained for several
seeds. For the "inject" stage (SGD with Nesterov momentum) and the "polish" stage (SGD with
momentum, linear decay), MAGIC replays the stage exactly as recorded (`MAGIC(trajectory=,
stage=)`) and scores its records for the behaviour records as queries, measured at the stage's
end. The truth: the same replay with each record's weight set to 0, i.e. retraining the stage
without it (later stages are not replayed). Prints Pearson and Spearman between the scores and
the loss change over records × queries, the mean per-query Spearman, MAGIC's own smoothness
check and its time.

    python benchmarks/magic_stage.py            # 3 seeds, ~20 s on 2 cores
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr

import headwater as hw
from headwater.demos import stages as demo
from headwater.stages import StageReplay


def leave_one_out(replay: StageReplay, task, queries: list[dict]) -> tuple[list[int], np.ndarray]:
    """(records the stage's batches hold, [records, queries] loss change without each one)."""
    batch = task.collate([task.whole(q) for q in queries])

    def losses(w):
        with torch.no_grad():
            return task.loss(replay.bind(replay.train(w)), batch).double().numpy()

    base = losses(replay.ones())
    used = sorted({i for b in replay.schedule for i in b})
    changes = []
    for i in used:
        w = replay.ones()
        w[i] = 0
        changes.append(losses(w) - base)
    return used, np.array(changes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--stages", nargs="+", default=["inject", "polish"])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/headwater-bench-magic-stage"))
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "magic_stage.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    rows = []
    for seed in range(args.seeds):
        traj, model, task, stages, behaviours, _, _ = demo.train_pipeline(args.workdir / str(seed), seed, finetune=demo.FINETUNE_SCALE)
        queries = [r for rs in behaviours.values() for r in rs]
        for stage in args.stages:
            t = time.time()
            scores = hw.MAGIC(model, task, hw.MagicConfig(), trajectory=traj, stage=stage).fit(stages[stage]).score(queries)
            seconds = time.time() - t
            used, truth = leave_one_out(StageReplay(traj, stage, model, task, stages[stage]), task, queries)
            s = scores.values[used]  # positive: the record lowers the query's loss, so leaving it out raises it
            rows.append(
                {
                    "seed": seed,
                    "stage": stage,
                    "records": len(used),
                    "queries": len(queries),
                    "pearson": float(pearsonr(s.ravel(), truth.ravel()).statistic),
                    "spearman": float(spearmanr(s.ravel(), truth.ravel()).statistic),
                    "per_query_spearman": float(np.mean([spearmanr(s[:, j], truth[:, j]).statistic for j in range(len(queries))])),
                    "smoothness_error": scores.diagnostics["smoothness"]["relative_error"],
                    "seconds": seconds,
                }
            )
    lines = [
        "| seed | stage | records × queries | Pearson | Spearman | per-query Spearman | smoothness check error | MAGIC s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['stage']} | {r['records']} × {r['queries']} | {r['pearson']:.3f} | {r['spearman']:.3f} | "
            f"{r['per_query_spearman']:.3f} | {r['smoothness_error']:.3f} | {r['seconds']:.1f} |"
        )
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "table": text}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
