"""Contrasts between benchmarks on a corpus map: which bins support A more than B.

Profiles are standardised across bins (benchmarks' scores live on different scales), so a
contrast A − B per bin says how much more the bin stands out for A than for B. With four
benchmarks in a 2×2 design (A, B differ in domain at one capability level; C, D at the other),
the interaction (A − B) − (C − D) per bin and the difference of profile correlations say
whether the domain contrast is sharper at one level. Intervals come from the map's bootstrap
replicates: documents are resampled jointly for all benchmarks (they share the corpus), items
per benchmark, so every contrast is a paired comparison.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import UserError
from .bins import JOINT, CorpusMap, bench_replicates
from .stats import percentile_interval, standardise


def _profiles(cmap: CorpusMap, view: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(standardised point profiles [K, B], their replicates [R, K, B], small-bin mask [K])."""
    point, reps = bench_replicates(cmap.arrays, cmap.info, view)
    small = cmap.arrays[f"{view}/count"] < cmap.info["config"]["min_bin_size"]
    point[small], reps[:, small] = np.nan, np.nan
    return standardise(point, axis=0), standardise(reps, axis=1), small


def _corr(x: np.ndarray, y: np.ndarray, axis: int) -> np.ndarray:
    """Pearson correlation along `axis` over bins where both are finite (x, y already standardised
    over the same bins, so the mean of products is the correlation)."""
    with np.errstate(invalid="ignore"):
        return np.nanmean(x * y, axis=axis)


def _index(cmap: CorpusMap, name: str | None) -> int | None:
    if name is None:
        return None
    if name not in cmap.benchmarks:
        raise UserError(f"no benchmark {name!r} in the map; it has {', '.join(cmap.benchmarks)}")
    return cmap.benchmarks.index(name)


def contrast(cmap: CorpusMap, a: str, b: str, c: str | None = None, d: str | None = None, view: str | None = None) -> tuple[pd.DataFrame, dict]:
    """Per bin: the standardised contrast A − B (and with C, D the interaction (A − B) − (C − D))
    with paired bootstrap intervals; plus a summary of profile correlations. `view`: one view
    (default: all of the map's views)."""
    if (c is None) != (d is None):
        raise UserError("a 2×2 contrast needs both --c and --d")
    ia, ib, ic, id_ = (_index(cmap, x) for x in (a, b, c, d))
    conf = cmap.info["config"]["confidence"]
    frames, summary = [], {"a": a, "b": b, "c": c, "d": d, "confidence": conf, "views": {}}
    for v in [view] if view else cmap.views:
        if v not in cmap.views:
            raise UserError(f"no view {v!r} in the map; it has {', '.join(cmap.views)}")
        z, zr, small = _profiles(cmap, v)
        frame = pd.DataFrame({"view": v, "bin": cmap.info["views"][v]["bins"], "n": cmap.arrays[f"{v}/count"].astype(np.int64), "small": small})
        stats = {"ab": (z[:, ia] - z[:, ib], zr[:, :, ia] - zr[:, :, ib])}
        if ic is not None:
            stats["cd"] = (z[:, ic] - z[:, id_], zr[:, :, ic] - zr[:, :, id_])
            stats["interaction"] = (stats["ab"][0] - stats["cd"][0], stats["ab"][1] - stats["cd"][1])
        for name, (point, reps) in stats.items():
            lo, hi = percentile_interval(reps, conf)
            frame[name], frame[f"{name}_lo"], frame[f"{name}_hi"] = point, lo, hi
            frame[f"{name}_excludes_0"] = (lo > 0) | (hi < 0)
        frames.append(frame)
        s = {"corr_ab": _interval(_corr(z[:, ia], z[:, ib], 0), _corr(zr[:, :, ia], zr[:, :, ib], 1), conf)}
        if ic is not None:
            s["corr_cd"] = _interval(_corr(z[:, ic], z[:, id_], 0), _corr(zr[:, :, ic], zr[:, :, id_], 1), conf)
            # corr(C, D) − corr(A, B) > 0: A and B draw on more different bins than C and D do.
            s["sharper_ab_than_cd"] = _interval(
                s["corr_cd"]["value"] - s["corr_ab"]["value"], _corr(zr[:, :, ic], zr[:, :, id_], 1) - _corr(zr[:, :, ia], zr[:, :, ib], 1), conf
            )
        summary["views"][v] = s
    return pd.concat(frames, ignore_index=True), summary


def _interval(point: float, reps: np.ndarray, conf: float) -> dict:
    lo, hi = percentile_interval(reps, conf)
    return {"value": float(point), "lo": float(lo), "hi": float(hi)}


def profile_correlations(cmap: CorpusMap, view: str) -> pd.DataFrame:
    """Correlation of standardised bin profiles between every pair of benchmarks, with paired
    bootstrap intervals."""
    z, zr, _ = _profiles(cmap, view)
    conf = cmap.info["config"]["confidence"]
    rows = []
    for (i, a), (j, b) in itertools.combinations(enumerate(cmap.benchmarks), 2):
        rows.append({"view": view, "a": a, "b": b, **_interval(_corr(z[:, i], z[:, j], 0), _corr(zr[:, :, i], zr[:, :, j], 1), conf)})
    return pd.DataFrame(rows)


def save_contrast(out: str | Path, frame: pd.DataFrame, summary: dict) -> Path:
    """`contrast-A-vs-B[-C-vs-D].csv/.parquet/.json` in the map directory."""
    out = Path(out)
    name = f"contrast-{summary['a']}-vs-{summary['b']}" + (f"-{summary['c']}-vs-{summary['d']}" if summary["c"] else "")
    name = name.replace("/", "_").replace(JOINT, "x")
    frame.to_csv(out / f"{name}.csv", index=False)
    frame.to_parquet(out / f"{name}.parquet", index=False)
    (out / f"{name}.json").write_text(json.dumps(summary, indent=1))
    return out / f"{name}.csv"
