"""The corpus map: which label bins (topic, format, topic × format, ...) support which benchmarks.

    index = hw.Index("runs/idx")
    attach_labels(index, labels_from_file("labels.parquet", index.train_ids))
    cmap = corpus_map(hw.TrackStar().fit(index), {"siqa": "siqa.jsonl", "arc": "arc.jsonl"},
                      load_labels(index), BinsConfig(by=["topic", "format"]))
    cmap.table                 # one row per view × bin × benchmark
    cmap.save("map/")

A record's score for a benchmark is its mean attribution score over the benchmark's items.
Per benchmark and bin: the mean score with a bootstrap interval over documents and benchmark
items, the total (scaled to the corpus when the index holds a stratified sample of it), top-k
enrichment, a z-score against the permutation null and Benjamini–Hochberg q-values across bins.
Scores stream once over the store (`accumulate.py`); with `torch.distributed` initialised each
rank scores its share of the blocks and the sums are all-reduced.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from ..config import H_BOOTSTRAP, H_BOOTSTRAP_SEED, H_BY, H_CONFIDENCE, Config, option
from ..data import record_text
from ..errors import UserError
from ..measurement import Measurement
from ..methods.base import Method, query_records
from ..methods.gradient import Dot
from .accumulate import BinAccumulator
from .labels import JOINT, Labels, label_text
from .stats import bh_qvalues, percentile_interval, permutation_z, query_bootstrap_weights, two_sided_p

FORMAT = "headwater.corpus-map/1"


@dataclass
class BinsConfig(Config):
    """How `headwater bins` aggregates attribution scores over label bins."""

    by: list[str] | None = option(None, H_BY)
    enrichment_k: int = option(20, "Top records of each benchmark item counted for the enrichment statistic (and listed per benchmark in map.json).")
    min_bin_size: int = option(20, "Bins with fewer records get no statistics (NaN) and no q-value.")
    bootstrap: int = option(200, H_BOOTSTRAP)
    confidence: float = option(0.95, H_CONFIDENCE)
    fdr: float = option(0.05, "False discovery rate at which a bin is marked significant (Benjamini–Hochberg).")
    min_confidence: float = option(0.0, "Labels whose confidence column is below this count as unlabelled.")
    corpus_sizes: str | None = option(
        None, "Sampling manifest: a CSV/parquet with label columns and `size`, the bins' record counts in the whole corpus."
    )
    examples: int = option(3, "Top-scoring example records kept per bin and benchmark.")
    bootstrap_seed: int = option(0, H_BOOTSTRAP_SEED)

    def __post_init__(self):
        super().__post_init__()
        if self.by:
            self.by = [c.strip() for b in self.by for c in b.split(",") if c.strip()]
        if len(set(self.by or [])) != len(self.by or []):
            raise UserError(f"--by names a column twice: {self.by}")
        for flag, value, ok in (
            ("--confidence", self.confidence, 0 < self.confidence < 1),
            ("--fdr", self.fdr, 0 < self.fdr < 1),
            ("--min-confidence", self.min_confidence, 0 <= self.min_confidence <= 1),
            ("--bootstrap", self.bootstrap, self.bootstrap >= 10),
            ("--enrichment-k", self.enrichment_k, self.enrichment_k >= 1),
            ("--min-bin-size", self.min_bin_size, self.min_bin_size >= 1),
            ("--examples", self.examples, self.examples >= 0),
            ("--bootstrap-seed", self.bootstrap_seed, self.bootstrap_seed >= 0),
        ):
            if not ok:
                raise UserError(f"{flag} out of range: {value} (intervals need --bootstrap of at least 10; rates lie in (0, 1))")


@dataclass
class CorpusMap:
    """The result of `corpus_map`: the bins table plus what contrasts and reports need.

    `table`: one row per (view, bin, benchmark); `arrays`: the accumulated sums per view
    (`count` [K], `S` [K, Q], `W` [R, K], `WX` [R, K, B]); `info`: benchmarks, their query
    columns, views and bins, the method, measurement and configuration, example records."""

    table: pd.DataFrame
    arrays: dict[str, np.ndarray]
    info: dict
    record_scores: np.ndarray | None = None  # [n_records, B] each record's benchmark score
    extra: dict = field(default_factory=dict)

    @property
    def benchmarks(self) -> list[str]:
        return list(self.info["benchmarks"])

    @property
    def views(self) -> list[str]:
        return list(self.info["views"])

    def save(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob("contrast-*"):  # contrasts of an earlier map in this directory would no longer match
            stale.unlink()
        self.table.to_parquet(out / "bins.parquet", index=False)
        self.table.to_csv(out / "bins.csv", index=False)
        save_file({k: np.ascontiguousarray(v) for k, v in self.arrays.items()}, str(out / "arrays.safetensors"))
        if self.record_scores is not None:
            save_file({"scores": np.ascontiguousarray(self.record_scores, dtype=np.float32)}, str(out / "record_scores.safetensors"))
        (out / "map.json").write_text(json.dumps({"format": FORMAT, **self.info}, indent=1, default=str))
        return out

    @classmethod
    def load(cls, path: str | Path) -> CorpusMap:
        path = Path(path)
        if not (path / "map.json").exists():
            raise UserError(f"{path} is not a corpus map (no map.json); make one with `headwater bins`")
        info = json.loads((path / "map.json").read_text())
        if info.pop("format", None) != FORMAT:
            raise UserError(f"{path}/map.json is not a headwater corpus map")
        rs = path / "record_scores.safetensors"
        return cls(
            pd.read_parquet(path / "bins.parquet"),
            load_file(str(path / "arrays.safetensors")),
            info,
            load_file(str(rs))["scores"] if rs.exists() else None,
        )

    def bins(self, view: str, benchmark: str) -> pd.DataFrame:
        """The rows of one view and benchmark, in bin order."""
        if view not in self.views:
            raise UserError(f"no view {view!r} in the map; it has {', '.join(self.views)}")
        if benchmark not in self.benchmarks:
            raise UserError(f"no benchmark {benchmark!r} in the map; it has {', '.join(self.benchmarks)}")
        t = self.table
        return t[(t["view"] == view) & (t["benchmark"] == benchmark)].reset_index(drop=True)


# ------------------------------------------------------------------ bins of records


def view_codes(labels: Labels, columns: list[str], min_confidence: float = 0.0) -> tuple[np.ndarray, list[str]]:
    """Each record's bin in the view over `columns` (int64 [n]) and the bins' names, in the order
    of the columns' sorted labels (a grid's row-major order for joint bins)."""
    codes, names = labels.codes(columns[0], min_confidence)
    for c in columns[1:]:
        more, more_names = labels.codes(c, min_confidence)
        combined = codes * len(more_names) + more
        present, codes = np.unique(combined, return_inverse=True)
        names = [f"{names[k // len(more_names)]}{JOINT}{more_names[k % len(more_names)]}" for k in present]
    return codes.astype(np.int64).reshape(-1), names


def views_of(labels: Labels, by: list[str] | None) -> dict[str, list[str]]:
    """View name -> label columns: each column alone (its marginal), and all together."""
    by = by or labels.columns
    for c in by:
        if c not in labels.columns:
            raise UserError(f"no label column {c!r}; the labels have {', '.join(labels.columns)}")
    views = {c: [c] for c in by}
    if len(by) > 1:
        views[JOINT.join(by)] = list(by)
    return views


def corpus_sizes(path: str | None, views: dict[str, list[str]], names: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """Per view whose columns the sampling manifest has: the corpus size of each bin [K] (NaN for
    bins the manifest does not list)."""
    if path is None:
        return {}
    p = Path(path)
    if not p.exists():
        raise UserError(f"sampling manifest {p} does not exist")
    try:
        frame = pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p)
    except (ValueError, OSError) as exc:
        raise UserError(f"sampling manifest {p} could not be read: {' '.join(str(exc).split())[:200]}") from None
    if "size" not in frame.columns:
        raise UserError(f"sampling manifest {p} needs a `size` column (records of each bin in the whole corpus)")
    out = {}
    for view, cols in views.items():
        if all(c in frame.columns for c in cols):
            grouped = frame.groupby(cols)["size"].sum()
            keys = [JOINT.join(map(label_text, k)) if isinstance(k, tuple) else label_text(k) for k in grouped.index]
            sizes = dict(zip(keys, grouped.to_numpy(dtype=np.float64)))
            out[view] = np.array([sizes.get(n, np.nan) for n in names[view]])
    if not out:
        raise UserError(f"sampling manifest {p} has none of the label columns {sorted({c for v in views.values() for c in v})}")
    return out


# ------------------------------------------------------------------ scoring


def benchmark_queries(benchmarks: dict) -> tuple[list[dict], list[slice], dict]:
    """All benchmarks' items as one query list, each benchmark's columns, and their ids."""
    if not benchmarks:
        raise UserError("give at least one benchmark (name=queries.jsonl)")
    records, columns, ids = [], [], {}
    for name, source in benchmarks.items():
        recs, qids = query_records(source)
        recs = [dict(r) for r in recs]
        if not recs:
            raise UserError(f"benchmark {name!r} has no items")
        columns.append(slice(len(records), len(records) + len(recs)))
        records += recs
        ids[name] = [str(i) for i in qids]
    return records, columns, ids


def score_stream(method: Method, queries: list[dict], measurement: Measurement | None, contrasts: list[tuple[str, str]], columns, names):
    """Blocks of scores [b, Q (+ one column per gradient-space contrast)] over the training rows."""
    measurement = measurement or method.default_measurement()
    if not contrasts:
        return method.score_blocks(queries, measurement)
    if not isinstance(method, Dot):
        raise UserError(f"gradient-space contrasts need a gradient method (dot, cosine, trackstar), not {method.name}")
    rows = method.query_rows(queries, measurement)
    extra = [rows[columns[names.index(a)]].mean(0) - rows[columns[names.index(b)]].mean(0) for a, b in contrasts]
    return method.score_rows(torch.cat([rows, torch.stack(extra)]), fit_on=len(rows))


def _sharded(blocks, rank: int, world: int):
    for i, block in enumerate(blocks):
        if i % world == rank:
            yield block


def checked_views(labels: Labels, config: BinsConfig, benchmarks: list[str], gradient_contrasts=()) -> tuple:
    """(views, codes, bin names, corpus sizes), after checking everything about the labels, the
    sampling manifest and the contrasts that can be checked before any scoring."""
    views = views_of(labels, config.by)
    codes, names = {}, {}
    for view, cols in views.items():
        codes[view], names[view] = view_codes(labels, cols, config.min_confidence)
    sizes = corpus_sizes(config.corpus_sizes, views, names)
    seen = set(benchmarks)
    for a, b in gradient_contrasts:
        for x in (a, b):
            if x not in benchmarks:
                raise UserError(f"contrast names benchmark {x!r}, which is not one of {', '.join(benchmarks)}")
        if f"{a}−{b}" in seen:
            raise UserError(f"the gradient-space contrast {a}−{b} is given twice or clashes with a benchmark of that name")
        seen.add(f"{a}−{b}")
    return views, codes, names, sizes


def corpus_map(
    method: Method,
    benchmarks: dict,
    labels: Labels,
    config: BinsConfig | None = None,
    measurement: Measurement | None = None,
    gradient_contrasts: list[tuple[str, str]] = (),
    progress: bool = False,
) -> CorpusMap:
    """Score every training record of a fitted `method` for every benchmark item in one pass and
    aggregate per bin. `benchmarks`: name -> query records (a file, list of dicts, Dataset).
    `gradient_contrasts`: (A, B) pairs scored with the mean query gradient of A minus B's, added as
    benchmarks named "A−B" (gradient methods only)."""
    import torch.distributed as dist

    config = config or BinsConfig()
    data = method.fitted()
    n = len(data)
    if len(labels.table) != n:
        raise UserError(f"the labels cover {len(labels.table)} records, the method was fitted on {n}")
    views, codes, names, sizes = checked_views(labels, config, list(benchmarks), gradient_contrasts)
    queries, columns, qids = benchmark_queries(benchmarks)
    for a, b in gradient_contrasts:
        columns.append(slice(columns[-1].stop, columns[-1].stop + 1))
        qids[f"{a}−{b}"] = ["mean gradient"]
    acc = BinAccumulator(
        codes,
        {v: len(nm) for v, nm in names.items()},
        columns,
        n,
        getattr(method.config, "pool", "max"),
        config.bootstrap,
        config.bootstrap_seed,
        config.enrichment_k,
        config.examples,
    )
    distributed = dist.is_available() and dist.is_initialized()
    store = getattr(method, "store", None) if isinstance(method, Dot) else None
    if distributed and store is not None:
        store.shard = (dist.get_rank(), dist.get_world_size())  # each rank reads and scores its own blocks
    try:
        blocks = score_stream(method, queries, measurement, list(gradient_contrasts), columns, list(benchmarks))
        if distributed and store is None:  # other methods score every block; each rank keeps its share
            blocks = _sharded(blocks, dist.get_rank(), dist.get_world_size())
        for _, ids, scores in tqdm(blocks, desc="bin statistics", unit="block", disable=not progress):
            acc.add_block(ids, scores)
    finally:
        if store is not None:
            store.shard = None
    acc.merge()
    if acc.records_scored() != n:
        raise UserError(f"{acc.records_scored()} of {n} records were scored; bins need every record")
    meas = (measurement or method.default_measurement()).describe()
    info = {
        "benchmarks": {
            b: {"columns": [columns[i].start, columns[i].stop], "queries": qids[b], "source": _source(benchmarks.get(b))} for i, b in enumerate(qids)
        },
        "views": {v: {"columns": cols, "bins": names[v]} for v, cols in views.items()},
        "n_records": n,
        "rows": acc.rows,
        "method": method.name,
        "measurement": meas,
        "method_config": method.config.to_dict(),
        "config": config.to_dict(),
        "labels": {**labels.source, "fingerprint": labels.fingerprint()},
        "corpus_sizes": {v: s.tolist() for v, s in sizes.items()},
        "top": {b: [[str(data.ids[int(r)]), float(s)] for s, r in zip(acc.top[0][:, i], acc.top[1][:, i])] for i, b in enumerate(qids)},
        "examples": _examples(acc, data, names, list(qids)),
    }
    arrays, (W, WX) = {}, acc.replicate_sums()
    for v in views:
        arrays.update({f"{v}/count": acc.count[v], f"{v}/S": acc.S[v], f"{v}/W": W[v], f"{v}/WX": WX[v]})
        # Enrichment counts each item's own top k: an item's supporting records stand out for it,
        # while averaging scores over items first dilutes them by the number of items.
        arrays[f"{v}/top"] = np.stack([np.bincount(codes[v][acc.qtop[1][:, c].ravel()], minlength=len(names[v])) for c in columns], 1).astype(
            np.float64
        )
    arrays.update({"total": acc.total, "total_sq": acc.total_sq})
    table = bins_table(arrays, info)
    return CorpusMap(table, arrays, info, acc.x)


def _source(spec) -> str | None:
    """Where a benchmark's items came from, when it was a file (so later commands can reload it)."""
    return str(Path(spec).resolve()) if isinstance(spec, (str, Path)) and Path(spec).exists() else None


def _examples(acc: BinAccumulator, data, names: dict, bench: list[str]) -> dict:
    out = {}
    for view, (vals, recs) in acc.best.items():
        out[view] = {
            names[view][k]: {
                b: [
                    {"id": str(data.ids[int(r)]), "score": float(s), "text": record_text(data.records[int(r)], 240)}
                    for s, r in zip(vals[k, i], recs[k, i])
                    if np.isfinite(s)
                ]
                for i, b in enumerate(bench)
            }
            for k in range(vals.shape[0])
        }
    return out


# ------------------------------------------------------------------ statistics from the sums


def bench_means(count: np.ndarray, S: np.ndarray, info: dict) -> np.ndarray:
    """Each bin's benchmark score [K, B]: the mean over the bin's records of the mean over the
    benchmark's items (NaN for an empty bin), from the sums `count` [K] and `S` [K, Q]."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack([S[:, a:b].mean(1) for a, b in (v["columns"] for v in info["benchmarks"].values())], 1) / count[:, None]


def bench_replicates(arrays: dict, info: dict, view: str, pooled: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(point means [K, B], replicates [R, K, B]) of each bin's benchmark score: document
    replicates (Poisson weights over random groups of records) plus the benchmark-item replicates' deviation (multinomial
    weights per benchmark), so both sources of uncertainty are in the interval. `pooled`: the
    whole corpus as one bin (K = 1), with the same replicates."""
    count, S, W, WX = (arrays[f"{view}/{k}"] for k in ("count", "S", "W", "WX"))
    if pooled:
        count, S, W, WX = count.sum(keepdims=True), S.sum(0, keepdims=True), W.sum(1, keepdims=True), WX.sum(1, keepdims=True)
    cfg, point = info["config"], bench_means(count, S, info)
    with np.errstate(invalid="ignore", divide="ignore"):
        docs = WX / W[:, :, None]
        items = []
        for i, (a, b) in enumerate(v["columns"] for v in info["benchmarks"].values()):
            u = query_bootstrap_weights(b - a, cfg["bootstrap"], cfg["bootstrap_seed"] + 1000 * i)  # [R, q]
            items.append((u @ S[:, a:b].T) / (b - a) / count[None, :])
        items = np.stack(items, 2)  # [R, K, B]
    return point, docs + items - point[None]


def bin_totals(arrays: dict, info: dict) -> dict[str, np.ndarray]:
    """Each view's bin totals [K, B]. Without a sampling manifest: the sums over the indexed
    records. With one: corpus totals, Σ over the manifest's strata inside the bin of stratum size
    × stratum mean (post-stratified, so unbiased when strata are sampled at different rates; NaN
    where a stratum with corpus records has none in the index, or the manifest covers no stratum
    of the view)."""
    views, sizes = info["views"], {v: np.asarray(s, dtype=np.float64) for v, s in info["corpus_sizes"].items()}
    means = {v: bench_means(arrays[f"{v}/count"], arrays[f"{v}/S"], info) for v in views}
    if not sizes:
        return {v: means[v] * arrays[f"{v}/count"][:, None] for v in views}
    out = {}
    for v, spec in views.items():
        # The finest covered view whose columns include this one's gives the strata.
        strata = max((s for s in sizes if set(spec["columns"]) <= set(views[s]["columns"])), key=lambda s: len(views[s]["columns"]), default=None)
        if strata is None:
            out[v] = np.full(means[v].shape, np.nan)
            continue
        cols = views[strata]["columns"]
        parent = [JOINT.join(name.split(JOINT)[cols.index(c)] for c in spec["columns"]) for name in views[strata]["bins"]]
        # A stratum of no corpus records adds 0; one the manifest lacks (NaN) or the index lacks (NaN mean) leaves the total unknown.
        stratum_total = np.where(sizes[strata][:, None] == 0, 0.0, sizes[strata][:, None] * means[strata])
        total = np.zeros(means[v].shape)
        for j, p in enumerate(parent):
            total[spec["bins"].index(p)] += stratum_total[j]
        out[v] = total
    return out


def bins_table(arrays: dict, info: dict) -> pd.DataFrame:
    """One row per (view, bin, benchmark) with every statistic; see the module docstring."""
    cfg, n = info["config"], info["n_records"]
    bench = list(info["benchmarks"])
    label_cols = sorted({c for v in info["views"].values() for c in v["columns"]})
    frames, totals = [], bin_totals(arrays, info)
    for view, spec in info["views"].items():
        count = arrays[f"{view}/count"]
        point, reps = bench_replicates(arrays, info, view)
        lo, hi = percentile_interval(reps, cfg["confidence"])
        # The bin's excess over the corpus mean, replicate by replicate: a shift that moves every
        # record alike (easier or harder benchmark items) cancels, so this interval is the one
        # that says whether the bin stands out.
        corpus, corpus_reps = bench_replicates(arrays, info, view, pooled=True)
        ex_lo, ex_hi = percentile_interval(reps - corpus_reps, cfg["confidence"])
        small = count < cfg["min_bin_size"]
        z = permutation_z(point, count, arrays["total"][None], arrays["total_sq"][None], n)
        z[small] = np.nan
        p = two_sided_p(z)
        top = arrays[f"{view}/top"]  # [K, B]
        k = top.sum(0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            enrichment = np.log(((top + 0.5) / (k + 0.5 * len(count))) / (count / n)[:, None])
        total = totals[view]
        for i, b in enumerate(bench):
            parts = [name.split(JOINT) for name in spec["bins"]]
            frame = pd.DataFrame({"view": view, "bin": spec["bins"], "benchmark": b})
            for c in label_cols:
                frame[c] = [ps[spec["columns"].index(c)] if c in spec["columns"] else None for ps in parts]
            frame["n"], frame["share"] = count.astype(np.int64), count / n
            frame["mean"], frame["lo"], frame["hi"] = point[:, i], lo[:, i], hi[:, i]
            frame["excess"], frame["excess_lo"], frame["excess_hi"] = point[:, i] - corpus[0, i], ex_lo[:, i], ex_hi[:, i]
            frame["total"] = total[:, i]
            frame["z"], frame["p"], frame["q"] = z[:, i], p[:, i], bh_qvalues(p[:, i])
            frame["top_k"], frame["enrichment"] = top[:, i], np.where(small, np.nan, enrichment[:, i])
            frame["small"] = small
            for col in ("mean", "lo", "hi", "excess", "excess_lo", "excess_hi"):
                frame.loc[small, col] = np.nan
            frame["significant"] = frame["q"] < cfg["fdr"]
            frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def bin_members(labels: Labels, cmap: CorpusMap, view: str, bin_name: str) -> np.ndarray:
    """Record indices of one bin of a view, from the labels the map was made with."""
    if view not in cmap.views:
        raise UserError(f"no view {view!r} in the map; it has {', '.join(cmap.views)}")
    codes, names = view_codes(labels, cmap.info["views"][view]["columns"], cmap.info["config"]["min_confidence"])
    if bin_name not in names:
        raise UserError(f"no bin {bin_name!r} in view {view!r}; bins: {', '.join(names)}")
    return np.flatnonzero(codes == names.index(bin_name))
