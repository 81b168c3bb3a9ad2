"""EK-FAC's whole convolution blocks from one sampled label per example or from the exact Fisher,
on the six CNN runs of `lds.py` (three CNNs, trained by SGD and by AdamW), with the peers' stored
per-target LDS beside them.

`CurvatureConfig.dense_conv_blocks` keeps a small convolution's whole Fisher block, P² entries.
The evidence for it (`ekfac_blocks.py`) used exact Gauss–Newton blocks; the sampled true Fisher
estimates such a block with rank at most the number of examples. This script scores EK-FAC at its
default damping both ways (`dense_fisher="true"` against the default, exact for a classifier) on
the same trained models and retraining, and takes the peers' per-target LDS from
`results/lds_cnn.json` and `results/lds_cnn_adamw.json` (Kronfluence and dattri were run on these
same models and subsets there; a check that the sampled blocks reproduce that run's EK-FAC to
1e-9 per target guards the pairing). Beside them, EK-FAC + 5 CG steps at CG's default damping
from `results/cg_check.json` (CG multiplies by the exact Fisher, so this change leaves it as it was).

    python benchmarks/ekfac_block_fisher.py --cache /tmp/lds-cache   # ~20 min on 2 cores, retraining cached
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

RESULTS = Path(__file__).parent / "results"
PEERS = ("Kronfluence EK-FAC", "Kronfluence EK-FAC (suggested)", "dattri EK-FAC")


def stored_runs(name: str) -> dict[str, dict]:
    """The methods' per-target LDS of each setting in one of lds.py's result files."""
    return {r["setting"]: r["methods"] for r in json.loads((RESULTS / name).read_text())["results"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, help="a folder for the retraining outcomes (reused when present)")
    p.add_argument("--out", type=Path, default=RESULTS / "ekfac_block_fisher.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    curvature = hw.CurvatureConfig(seed=0, batch_size=32)  # as lds.py
    cg = {r["setting"]: r for r in json.loads((RESULTS / "cg_check.json").read_text())["results"]}
    rows = []
    for argv, stored in (((), stored_runs("lds_cnn.json")), (("--adamw",), stored_runs("lds_cnn_adamw.json"))):
        for setting, final, masks, losses in damping.trained_tasks(args.cache, (lds.small_cnn, lds.gratings_cnn, lds.motif_cnn), argv):
            per = {}
            for label, fisher in (("sampled blocks", "true"), ("exact blocks (default)", None)):
                config = hw.InfluenceConfig(curvature=dataclasses.replace(curvature, dense_fisher=fisher))
                scores = hw.EKFAC(final, setting.task, config).fit(setting.train).score(setting.targets)
                per[label] = hw.lds(scores, masks, losses.mean(0))[1]
            before, now = per.values()
            row = {"setting": setting.name, "lds": {k: float(v.mean()) for k, v in per.items()}}
            row["now − before"] = (float(np.mean(now - before)), *hw.query_interval(now - before))
            peers = stored.get(setting.name, {})
            if np.allclose(peers.get("EK-FAC influence", {}).get("per_target", []), before, rtol=0, atol=1e-9):
                for peer in PEERS:
                    theirs = np.array(peers[peer]["per_target"])
                    row[f"now − {peer}"] = (float(np.mean(now - theirs)), *hw.query_interval(now - theirs))
                    row["lds"][peer] = float(theirs.mean())
            else:
                row["peers"] = "not paired: the stored run's EK-FAC differs from the sampled blocks here"
            run = cg.get(setting.name, {})
            if np.allclose(run.get("EK-FAC per target", []), before, rtol=0, atol=1e-9):
                theirs = np.array(run["cg"]["10 5"]["per_target"])
                row["CG, 5 steps − now"] = (float(np.mean(theirs - now)), *hw.query_interval(theirs - now))
                row["lds"]["CG, 5 steps"] = float(theirs.mean())
            rows.append(row)
            print(json.dumps(row, ensure_ascii=False), flush=True)
    cell = lambda r, key: f"{r[key][0]:+.3f} [{r[key][1]:+.3f}, {r[key][2]:+.3f}]" if key in r else "not paired"  # noqa: E731
    lines = [
        "| CNN | sampled blocks | exact blocks (default) | exact − sampled | − Kronfluence | − Kronfluence, suggested | − dattri | CG, 5 steps − exact blocks |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lds_ = r["lds"]
        diffs = " | ".join(cell(r, k) for k in ("now − before", *(f"now − {peer}" for peer in PEERS), "CG, 5 steps − now"))
        lines.append(f"| {r['setting']} | {lds_['sampled blocks']:.3f} | {lds_['exact blocks (default)']:.3f} | {diffs} |")
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "table": text}, indent=2, ensure_ascii=False))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
