"""Where EK-FAC loses LDS on the CNNs of `lds.py`: each tracked module's part of the influence
alone, and EK-FAC with one module's (or every module's) Kronecker-factored block replaced by the
exact Gauss–Newton block (a dense [P_m, P_m] solve, damped like EK-FAC's: a fraction of the
block's mean eigenvalue, which EK-FAC's corrected eigenvalues share). Both use the exact Fisher,
so the difference is the Kronecker eigenbasis alone. Tiny models only (dense blocks). The
evidence for `CurvatureConfig.dense_conv_blocks`, which keeps small convolutions' blocks whole.

    python benchmarks/ekfac_blocks.py --cache /tmp/lds-cache   # retraining outcomes shared with damping.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import damping  # noqa: E402  (beside this script)
import lds  # noqa: E402
import torch

import headwater as hw
from headwater.methods.influence import DenseCurvature, dense_gauss_newton

SETTINGS = (lds.tabular, lds.image_mlp, lds.small_cnn, lds.gratings_cnn, lds.motif_cnn)
CURVATURE = hw.CurvatureConfig(fisher="exact", seed=0, batch_size=32, dense_conv_blocks=0)  # EK-FAC as it was: Kronecker blocks throughout
DAMPINGS = [1.0, 3.0]  # the default, and the best of EK-FAC's own sweep on two tasks (damping.py)


class MixedCurvature:
    """EK-FAC's blocks, except the modules in `exact`, whose dense Gauss–Newton block is solved;
    with `only`, every other module's part of the score is zero."""

    def __init__(self, ekfac: hw.Curvature, dense: DenseCurvature, exact: list[str], only: str | None = None):
        self.ekfac, self.modules, self.blocks, self.only, start = ekfac, ekfac.modules, {}, only, 0
        for name, (o, i) in dense.shapes.items():
            if name in exact:
                block = dense.matrix[start : start + o * i, start : start + o * i]
                self.blocks[name] = DenseCurvature(block, {name: (o, i)})
            start += o * i

    def inverse_hvp(self, grads: dict, damping: float, mode: str = "relative", ekfac: bool = True) -> dict:
        out = self.ekfac.inverse_hvp({n: g for n, g in grads.items() if n not in self.blocks}, damping, mode, ekfac)
        for name, block in self.blocks.items():  # relative: a fraction of the block's own mean eigenvalue
            if name in grads:
                out |= block.inverse_hvp({name: grads[name]}, damping, mode)
        return {n: g if self.only in (None, n) else torch.zeros_like(g) for n, g in out.items()}

    def damping_for(self, *args, **kwargs) -> float:
        return self.ekfac.damping_for(*args, **kwargs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, help="a folder for the retraining outcomes (reused when present)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ekfac_blocks.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    settings = lds.parser().parse_args([])
    results = []
    for make in SETTINGS:
        setting = make(settings)
        final, _ = setting.fit(setting.train, seed=0)
        masks = hw.subset_masks(len(setting.train), settings.subsets, 0.5, seed=settings.seed)
        losses = damping.outcomes(setting, masks, settings.seeds, args.cache)
        fitted = hw.EKFAC(final, setting.task, hw.InfluenceConfig(curvature=CURVATURE)).fit(setting.train)
        ekfac, names = fitted.curvature, list(fitted.curvature.modules)
        dense = dense_gauss_newton(final, setting.task, setting.train)
        kinds = {n: type(final.get_submodule(n)).__name__ for n in names}
        row = {"setting": setting.name, "modules": kinds, "lds": {}}

        def score(curvature, damping_: float = 1.0) -> float:
            fitted.curvature, fitted.config = curvature, dataclasses.replace(fitted.config, damping=damping_)
            return hw.lds(fitted.score(setting.targets), masks, losses.mean(0))[0]

        for d in DAMPINGS:
            row["lds"][f"EK-FAC × {d:g}"] = score(ekfac, d)
            row["lds"][f"every block exact × {d:g}"] = score(MixedCurvature(ekfac, dense, names), d)
        for name in names:
            row["lds"][f"{name} ({kinds[name]}) exact, the rest EK-FAC"] = score(MixedCurvature(ekfac, dense, [name]))
        for name in names:
            row["lds"][f"{name} ({kinds[name]}) alone (EK-FAC)"] = score(MixedCurvature(ekfac, dense, [], only=name))
        results.append(row)
        print(f"\n{setting.name}\n" + "\n".join(f"  {k}: {v:.3f}" for k, v in row["lds"].items()), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
