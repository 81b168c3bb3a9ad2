"""Does `--cg-steps` ever score below the solve it refines? EK-FAC at its default against EK-FAC
refined by CG at 10 × and at 30 × the model's mean eigenvalue (CG's defaults: 10 × on a
classifier's exact Fisher, 30 × on a sampled one, the LM's; 30 × for both until the CNNs' whole
convolution blocks raised EK-FAC above it), on every LDS setting of `lds.py`: the five classifiers trained by SGD and by AdamW, and
the LM. LDS after 0 (CG's own start), 5 and 10 steps, and the paired difference from EK-FAC
over queries with its 95% interval.

    python benchmarks/cg_check.py --cache /tmp/lds-cache   # retraining outcomes shared with damping.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import damping  # noqa: E402  (beside this script)
import lds  # noqa: E402
import numpy as np
import torch

import headwater as hw

CLASSIFIERS = (lds.tabular, lds.image_mlp, lds.small_cnn, lds.gratings_cnn, lds.motif_cnn)
STEPS = [0, 5, 10]
DAMPINGS = [10.0, 30.0]  # × the model's mean eigenvalue: CG's defaults on an exact and on a sampled Fisher


def settings(cache: Path | None):
    yield from damping.trained_tasks(cache, CLASSIFIERS)
    yield from damping.trained_tasks(cache, CLASSIFIERS, ["--adamw"])
    yield from damping.trained_tasks(cache, (lds.language_model,))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, help="a folder for the retraining outcomes (reused when present)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cg_check.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    results, lines = [], []
    header = " | ".join(f"CG {d:g}×, {k} steps" for d in DAMPINGS for k in STEPS)
    lines += [f"| setting | EK-FAC | {header} |", "|---" * (2 + len(DAMPINGS) * len(STEPS)) + "|"]
    for setting, final, masks, losses in settings(args.cache):
        target = losses.mean(0)
        ekfac = hw.EKFAC(final, setting.task, hw.InfluenceConfig(curvature=damping.CURVATURE)).fit(setting.train)
        base, base_q = hw.lds(ekfac.score(setting.targets), masks, target)
        refined = hw.EKFAC(final, setting.task, hw.InfluenceConfig(curvature=dataclasses.replace(damping.CURVATURE, fisher=None), cg_steps=1))
        refined.fit(setting.train)
        row = {"setting": setting.name, "EK-FAC": base, "EK-FAC per target": base_q.tolist(), "fisher": refined.curvature.config.fisher, "cg": {}}
        cells = []
        for d in DAMPINGS:
            for k in STEPS:
                refined.config = dataclasses.replace(refined.config, cg_steps=k, damping=d, damping_mode="model")
                value, per_query = hw.lds(refined.score(setting.targets), masks, target)
                diff = per_query - base_q
                lo, hi = hw.query_interval(diff)
                row["cg"][f"{d:g} {k}"] = {
                    "lds": value,
                    "per_target": per_query.tolist(),
                    "minus_ekfac": float(np.nanmean(diff)),
                    "interval": [lo, hi],
                }
                cells.append(f"{value:.3f} ({np.nanmean(diff):+.3f} [{lo:+.3f}, {hi:+.3f}])")
        results.append(row)
        lines.append(f"| {setting.name} | {base:.3f} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results, "table": text}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
