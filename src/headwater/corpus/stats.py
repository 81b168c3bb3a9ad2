"""The statistics behind a corpus map, as plain numpy on small arrays (bins × queries).

- `permutation_z`: a bin's mean score against the permutation null (labels shuffled, bin sizes
  kept), from the exact mean and variance of the mean of a size-n sample drawn without
  replacement from the N scores, so no shuffles are needed.
- `bh_qvalues`: Benjamini–Hochberg q-values.
- `splitmix64`, `poisson_weights`: a counter-based hash and the Poisson(1) bootstrap weights it
  gives each (index, replicate), so any split of the store across blocks or ranks gives the same
  groups of records and the same replicates.
- `percentile_interval`: the interval of bootstrap replicates.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A counter-based hash uint64 -> uint64 (splitmix64's finaliser)."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
        return x ^ (x >> np.uint64(31))


# P(Poisson(1) <= k) = e⁻¹ Σ_{j≤k} 1/j! for k = 0..12; a uniform past the last entry maps to 13
# (probability < 1e-10).
_POISSON_CDF = np.cumsum([math.exp(-1) / math.factorial(k) for k in range(13)])


def poisson_weights(records: np.ndarray, replicates: int, seed: int = 0) -> np.ndarray:
    """Poisson(1) bootstrap weights, float64 [replicates, len(records)]: a function of (seed,
    index, replicate) only (the indices are records or groups of records), so blocks and ranks
    agree without sharing a generator."""
    r = np.asarray(records, dtype=np.uint64)[None, :]
    b = np.arange(replicates, dtype=np.uint64)[:, None]
    with np.errstate(over="ignore"):
        key = splitmix64((r * np.uint64(0x100000001B3)) ^ splitmix64(b + np.uint64(seed) * np.uint64(0x9E3779B1)))
    u = (key >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return np.searchsorted(_POISSON_CDF, u, side="right").astype(np.float64)


def permutation_z(bin_mean: np.ndarray, bin_n: np.ndarray, total: np.ndarray, total_sq: np.ndarray, n: int) -> np.ndarray:
    """z of each bin's mean against the permutation null: under random relabelling a bin of size
    m has mean E = x̄ and variance S²/m · (N − m)/N, with S² the scores' variance (ddof 1).
    `bin_mean` [bins, ...], `bin_n` [bins]; `total`, `total_sq`: Σx and Σx² over all N records."""
    mean = total / n
    s2 = np.maximum(total_sq - n * mean**2, 0.0) / max(n - 1, 1)
    m = np.asarray(bin_n, dtype=np.float64).reshape(-1, *([1] * (np.ndim(bin_mean) - 1)))
    var = s2 / np.maximum(m, 1) * np.maximum(n - m, 0) / n
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(var > 0, (bin_mean - mean) / np.sqrt(var), np.nan)


def two_sided_p(z: np.ndarray) -> np.ndarray:
    from scipy import stats  # imported here: scipy.stats costs every CLI call a second at start-up

    return np.where(np.isnan(z), np.nan, 2 * stats.norm.sf(np.abs(z)))


def bh_qvalues(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg q-values of the finite p-values (NaN stays NaN)."""
    p = np.asarray(p, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    m = int(ok.sum())
    if m == 0:
        return q
    order = np.argsort(p[ok])
    ranked = p[ok][order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(ranked, 1.0)
    q[ok] = out
    return q


def percentile_interval(replicates: np.ndarray, confidence: float = 0.95, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) percentile bounds of bootstrap replicates along `axis` (NaNs ignored)."""
    alpha = (1 - confidence) / 2
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN replicates of small bins give NaN, as intended
        lo = np.nanquantile(replicates, alpha, axis=axis)
        hi = np.nanquantile(replicates, 1 - alpha, axis=axis)
    return lo, hi


def query_bootstrap_weights(n_queries: int, replicates: int, seed: int) -> np.ndarray:
    """Multinomial resampling weights of a benchmark's items, [replicates, n_queries] summing to
    n_queries per replicate."""
    rng = np.random.default_rng([seed, n_queries, 7])
    return rng.multinomial(n_queries, np.full(n_queries, 1.0 / n_queries), size=replicates).astype(np.float64)


def standardise(profile: np.ndarray, axis: int = -1) -> np.ndarray:
    """(x − mean) / sd over bins (NaN bins ignored), so benchmarks of different score scales compare."""
    with np.errstate(invalid="ignore", divide="ignore"):
        mu = np.nanmean(profile, axis=axis, keepdims=True)
        sd = np.nanstd(profile, axis=axis, keepdims=True)
        return (profile - mu) / np.where(sd > 0, sd, np.nan)
