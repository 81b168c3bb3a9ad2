"""EK-FAC, KFAC, TrackStar and TRAK LDS as the damping varies, on the four settings of `lds.py`:
the evidence for InfluenceConfig's, TrackStarConfig's and TRAKConfig's default damping (a fraction
of the mean eigenvalue of the matrix each inverts). EK-FAC and KFAC also at absolute dampings
("abs"), with each module's mean eigenvalue, to show why the default is relative; TRAK with one
model and with lds.py's ensemble, and unprojected at its default damping.

    python benchmarks/damping.py                       # ~8 min on 2 cores (retraining dominates)
    python benchmarks/damping.py --cache /tmp/lds-cache  # reuse retraining outcomes between runs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import lds  # noqa: E402  (beside this script)
import numpy as np
import torch

import headwater as hw

DAMPINGS = [0.03, 0.1, 0.3, 1.0, 3.0, 10.0]
ABSOLUTE = [1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0]
TRAK_MODELS = 5  # as lds.py's ensemble


def outcomes(setting: lds.Setting, masks: np.ndarray, seeds: int, cache: Path | None) -> np.ndarray:
    """Retrained target losses [seeds, subsets, targets], from `cache` when it holds them."""
    path = cache / f"{setting.name.replace(' ', '-')}.npy" if cache else None
    if path is not None and path.exists():
        return np.load(path)
    losses = hw.retrain_outcomes(setting.train_and_measure, masks, seeds=list(range(seeds)), progress=True)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, losses)
    return losses


CURVATURE = hw.CurvatureConfig(fisher="true", seed=0, batch_size=32)  # as lds.py


def trained_tasks(cache: Path | None, makes=(lds.tabular, lds.image_mlp, lds.small_cnn, lds.language_model), argv=()):
    """lds.py's settings (by default its first four) at the sizes its command line `argv` gives,
    one at a time: (setting, trained model, subset masks [subsets, n], retrained target losses
    [seeds, subsets, targets])."""
    settings = lds.parser().parse_args(list(argv))
    for make in makes:
        setting = make(settings)
        final, _ = setting.fit(setting.train, seed=0)
        masks = hw.subset_masks(len(setting.train), settings.subsets, 0.5, seed=settings.seed)
        yield setting, final, masks, outcomes(setting, masks, settings.seeds, cache)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, help="a folder for the retraining outcomes (reused when present)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "damping.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    results = []
    for setting, final, masks, losses in trained_tasks(args.cache):
        row = {"setting": setting.name, "seed_ceiling": hw.seed_ceiling(losses), "lds": {}}
        for method in (hw.EKFAC, hw.KFAC):
            fitted = method(final, setting.task, hw.InfluenceConfig(curvature=CURVATURE)).fit(setting.train)
            row.setdefault("mean_eigenvalue", {})[method.__name__] = {
                n: float(m.eigenvalues(fitted.ekfac).mean()) for n, m in fitted.curvature.modules.items()
            }
            for damping in DAMPINGS:
                fitted.config = dataclasses.replace(fitted.config, damping=damping)  # the factors do not depend on it
                row["lds"][f"{method.__name__} {damping:g}"] = hw.lds(fitted.score(setting.targets), masks, losses.mean(0))[0]
            for damping in ABSOLUTE:
                fitted.config = dataclasses.replace(fitted.config, damping=damping, damping_mode="absolute")
                row["lds"][f"{method.__name__} abs-{damping:g}"] = hw.lds(fitted.score(setting.targets), masks, losses.mean(0))[0]
        for damping in DAMPINGS:
            config = hw.TrackStarConfig(projection=setting.projection, batch_size=32, damping=damping)
            scores = hw.TrackStar(final, setting.task, config).fit(setting.train).score(setting.targets)
            row["lds"][f"TrackStar {damping:g}"] = hw.lds(scores, masks, losses.mean(0))[0]
        ensemble = [final] + [setting.fit(setting.train, seed=s)[0] for s in range(1, TRAK_MODELS)]
        trak = lambda models, **kw: hw.TRAK(models, setting.task, hw.TRAKConfig(batch_size=32, **kw)).fit(setting.train)  # noqa: E731
        for damping in DAMPINGS:
            for models in ([final], ensemble):
                scores = trak(models, projection=setting.projection, damping=damping).score(setting.targets, hw.Loss())
                row["lds"][f"TRAK-{len(models)} {damping:g}"] = hw.lds(scores, masks, losses.mean(0))[0]
        scores = trak([final], projection=hw.ProjectionConfig("none")).score(setting.targets, hw.Loss())
        row["lds"]["TRAK-1 unprojected"] = hw.lds(scores, masks, losses.mean(0))[0]
        results.append(row)
        print(f"{setting.name}: " + ", ".join(f"{k} {v:.3f}" for k, v in row["lds"].items()), flush=True)
    lines = ["| method | damping | " + " | ".join(r["setting"] for r in results) + " | mean |", "|---" * (3 + len(results)) + "|"]
    for key in results[0]["lds"]:
        values = [r["lds"][key] for r in results]
        name, damping = key.split()
        lines.append(f"| {name} | {damping} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {np.mean(values):.3f} |")
    print("\n" + "\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"dampings": DAMPINGS, "results": results, "table": "\n".join(lines)}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
