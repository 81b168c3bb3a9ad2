"""Does MAGIC's smoothness check tell a user when to trust its scores? On the four settings of
`lds.py`: single-run and seed-ensemble MAGIC's LDS beside EK-FAC's, and the check's relative
error (metagradient against one more training run along a random 1% reweighting) for four
random directions.

    python benchmarks/magic_smoothness.py --cache /tmp/lds-cache   # ~6 min on 2 cores with the cache
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import damping  # noqa: E402  (beside this script)
import numpy as np
import torch

import headwater as hw

DIRECTIONS = 4


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, help="a folder for the retraining outcomes (shared with damping.py, cg.py)")
    p.add_argument("--seeds", type=int, default=4, help="replay seeds of the ensemble")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "magic_smoothness.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    results = []
    for setting, final, masks, losses in damping.trained_tasks(args.cache):
        target = losses.mean(0)
        lds = lambda scores: hw.lds(scores, masks, target)[0]  # noqa: E731
        ekfac = hw.EKFAC(final, setting.task, hw.InfluenceConfig(curvature=damping.CURVATURE)).fit(setting.train)
        magic = lambda seeds: hw.MAGIC(setting.init(0), setting.task, hw.MagicConfig(run=setting.run, replay_seeds=seeds)).fit(setting.train)  # noqa: E731
        single = magic([0])
        scores = single.score(setting.targets)
        replay, task = single.replays[0], setting.task
        batch = task.collate([task.whole(t) for t in setting.targets])
        measure = lambda m: task.loss(m, batch)  # noqa: E731  (MAGIC's objective for these queries)
        beta = replay.metagradient(measure)
        errors = [replay.metasmoothness(measure, eps=0.01, seed=s, metagradient=beta)["relative_error"] for s in range(DIRECTIONS)]
        row = {
            "setting": setting.name,
            "EK-FAC": lds(ekfac.score(setting.targets)),
            "MAGIC (1 run)": lds(scores),
            f"MAGIC ({args.seeds} seeds)": lds(magic(list(range(args.seeds))).score(setting.targets)),
            "check, relative error": errors,
        }
        results.append(row)
        print(setting.name, {k: np.round(v, 3).tolist() for k, v in row.items() if k != "setting"}, flush=True)
    lines = [
        f"| setting | EK-FAC | MAGIC (1 run) | MAGIC ({args.seeds} seeds) | smoothness check, relative error ({DIRECTIONS} directions) |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        errs = ", ".join(f"{e:.2g}" for e in r["check, relative error"])
        lines.append(f"| {r['setting']} | {r['EK-FAC']:.3f} | {r['MAGIC (1 run)']:.3f} | {r[f'MAGIC ({args.seeds} seeds)']:.3f} | {errs} |")
    text = "\n".join(lines)
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results, "table": text}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
