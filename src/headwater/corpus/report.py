"""The report of a corpus map: figures and one self-contained HTML page.

    write_report("map/", "map/report.html", unlearn_dirs=["unlearn/law-A"])

The page embeds every figure as a base64 data URI and carries its own CSS, so it opens from
disk with no server and no network. The PNGs are also written to `report_files/` beside the
page, and the top-bins table to `report-top-bins.csv`, for use elsewhere.
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import UserError
from ..plots import pyplot
from .bins import JOINT, CorpusMap

DPI = 120
TOP_N = 10  # bins per benchmark in the page's table (the CSV has all of them)
EXAMPLES, EXAMPLE_CHARS = 3, 180
ARMS, BENCHES = ("top", "random"), ("aligned", "control")  # unlearn.json's arms and benchmarks
HIGHLIGHT, LOW, PLAIN = "#d95f02", "#2c7bb6", "#c4c4c4"  # significant above / below the centre, neither


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("_") or "x"


def _f(x, spec: str = ".3g") -> str:
    """A number for a table; missing values as an en dash."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "–"
    return format(x, spec) if np.isfinite(x) else "–"


def _ci(x, lo, hi) -> str:
    return f"{_f(x)} [{_f(lo)}, {_f(hi)}]"


def _centre(cmap: CorpusMap, i: int) -> float:
    """The corpus-wide mean score of benchmark i: what a bin's z-score compares against."""
    return float(np.asarray(cmap.arrays["total"])[i] / cmap.info["n_records"]) if "total" in cmap.arrays else 0.0


def _fdr(cmap: CorpusMap) -> float:
    """The false discovery rate at which bins were marked significant (named `alpha` in older maps)."""
    cfg = cmap.info["config"]
    return cfg.get("fdr", cfg.get("alpha", 0.05))


def _joint(cmap: CorpusMap) -> str | None:
    return next((v for v, s in cmap.info["views"].items() if len(s["columns"]) > 1), None)


# ------------------------------------------------------------------------------------ figures


def _grid(frame: pd.DataFrame, columns: list[str]) -> tuple[list[str], list[str], dict]:
    """Rows (first label's values), columns (the other labels' values joined) and each column of
    `frame` laid out on that grid (NaN / False where the combination has no records)."""
    keys = [b.partition(JOINT)[::2] for b in frame["bin"]]
    rows, cols = sorted({k[0] for k in keys}), sorted({k[1] for k in keys})
    at = tuple(np.array(a) for a in zip(*[(rows.index(r), cols.index(c)) for r, c in keys]))
    grids = {}
    for c in columns:
        flag = pd.api.types.is_bool_dtype(frame[c])  # flags stay bool: a NaN would read as True
        g = np.zeros((len(rows), len(cols)), bool) if flag else np.full((len(rows), len(cols)), np.nan)
        g[at] = frame[c].to_numpy(dtype=bool if flag else float)
        grids[c] = g
    return rows, cols, grids


def _heatmap(ax, fig, g: dict, rows, cols, value: str, mark: str, centre: float, bound: float, title: str, label: str, xlabel: str, ylabel: str):
    """One grid: a diverging colour scale centred on `centre`, n in each cell, small bins hatched
    grey, marked cells (significant / interval excludes 0) with a star and a bold border."""
    plt = pyplot()
    from matplotlib.patches import Rectangle

    cm = plt.get_cmap("RdBu_r").with_extremes(bad="white")  # white: combinations with no records at all
    im = ax.imshow(g[value], cmap=cm, vmin=centre - bound, vmax=centre + bound, aspect="auto")
    size = 10 if g[value].size <= 40 else 9 if g[value].size <= 100 else 8
    for (i, j), v in np.ndenumerate(g[value]):
        n = g["n"][i, j]
        if g["small"][i, j]:
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="#e0e0e0", edgecolor="#9e9e9e", hatch="///", linewidth=0))
        if g[mark][i, j]:
            ax.add_patch(Rectangle((j - 0.46, i - 0.46), 0.92, 0.92, fill=False, edgecolor="black", linewidth=2.2))
        if not np.isfinite(n):
            continue
        text = f"n={int(n)}" if not np.isfinite(v) else f"{v:.2g}{' ★' if g[mark][i, j] else ''}\nn={int(n)}"
        dark = np.isfinite(v) and abs(v - centre) > 0.6 * bound
        ax.text(j, i, text, ha="center", va="center", fontsize=size, color="white" if dark else "black", linespacing=1.3)
    long = max(map(len, cols)) > 6
    ax.set_xticks(range(len(cols)), cols, rotation=30 if long else 0, ha="right" if long else "center")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    fig.colorbar(im, ax=ax, shrink=min(0.85, 6 / len(rows)) if len(rows) > 8 else 0.85, aspect=25, label=label)


def _grid_figure(path: Path, frame: pd.DataFrame, panels: list[tuple[str, str, str]], centre: float, label: str, labels: list[str]) -> Path:
    """A figure of one or more grids over the joint view. `panels`: (value column, mark column, title)."""
    plt = pyplot()
    rows, cols, g = _grid(frame, ["n", "small"] + [c for v, m, _ in panels for c in (v, m)])
    values = np.concatenate([g[v].ravel() - centre for v, _, _ in panels])
    bound = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    width = 2.6 + max(0.95 * len(cols), 3.0) + 0.07 * max(map(len, rows))
    height = 1.8 + 0.62 * len(rows) + (0.06 * max(map(len, cols)) if max(map(len, cols)) > 6 else 0)
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), height), squeeze=False, layout="constrained")
    for ax, (value, mark, title) in zip(axes[0], panels):
        _heatmap(ax, fig, g, rows, cols, value, mark, centre, bound or 1.0, title, label, JOINT.join(labels[1:]), labels[0])
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _bars(ax, frame: pd.DataFrame, value: str, lo: str, hi: str, mark: str, centre: float, xlabel: str, title: str):
    """Horizontal bars from `centre` (the corpus mean, or 0 for contrasts) with the interval as
    error bars; marked bars highlighted; small bins listed without a bar."""
    y = np.arange(len(frame))
    v, a, b = (frame[c].to_numpy(dtype=float) for c in (value, lo, hi))
    colours = np.where(frame[mark].to_numpy(dtype=bool), np.where(v > centre, HIGHLIGHT, LOW), PLAIN)
    ax.barh(y, np.nan_to_num(v - centre), left=centre, color=colours, height=0.7)
    err = np.clip(np.nan_to_num(np.stack([v - a, b - v])), 0, None)
    ax.errorbar(np.where(np.isfinite(v), v, centre), y, xerr=err, fmt="none", ecolor="black", elinewidth=1, capsize=3)
    ax.axvline(centre, color="black", linewidth=0.8, linestyle="--")
    for i in np.flatnonzero(~np.isfinite(v)):
        ax.text(centre, i, "  too few records", va="center", fontsize=8, color="grey")
    ax.set_yticks(y, [f"{name}  (n={n})" for name, n in zip(frame["bin"], frame["n"])])
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=11)
    ax.grid(axis="x", alpha=0.3)


def _bar_figure(path: Path, panels: list, centre: float) -> Path:
    plt = pyplot()
    k, width = max(len(p[0]) for p in panels), 1.0 + 0.075 * max(len(f"{b}  (n={n})") for p in panels for b, n in zip(p[0]["bin"], p[0]["n"]))
    fig, axes = plt.subplots(1, len(panels), figsize=((width + 4.0) * len(panels), 1.4 + 0.34 * k), squeeze=False, layout="constrained")
    for ax, (frame, value, mark, xlabel, title) in zip(axes[0], panels):
        _bars(ax, frame, value, f"{value}_lo" if value != "mean" else "lo", f"{value}_hi" if value != "mean" else "hi", mark, centre, xlabel, title)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _contrast_name(summary: dict) -> str:
    ab = f"{summary['a']} − {summary['b']}"
    return f"({ab}) − ({summary['c']} − {summary['d']})" if summary.get("c") else ab


def write_figures(cmap: CorpusMap, out: Path, contrasts: list[tuple[pd.DataFrame, dict]] = ()) -> dict[str, Path]:
    """PNGs into `out`: per benchmark the joint view's heatmap (without a joint view its bar chart
    is the main figure), per single-column view and benchmark a bar chart of the means with
    their intervals, per contrast a heatmap (or bars) of A − B and the interaction. Name -> path."""
    out, figures, joint = Path(out), {}, _joint(cmap)
    out.mkdir(parents=True, exist_ok=True)
    xlabel = f"bin mean − corpus mean, with its CI\ncoloured: q < {_fdr(cmap):g}, orange above, blue below"
    for i, bench in enumerate(cmap.benchmarks):
        centre = _centre(cmap, i)
        if joint:
            panel = [("mean", "significant", f"{bench}: mean score by {joint}")]
            path, labels = out / f"joint-{_slug(bench)}.png", cmap.info["views"][joint]["columns"]
            figures[f"joint-{bench}"] = _grid_figure(path, cmap.bins(joint, bench), panel, centre, "mean score (white: corpus mean)", labels)
        for view in (v for v, spec in cmap.info["views"].items() if len(spec["columns"]) == 1):
            panel = [(cmap.bins(view, bench), "excess", "significant", xlabel, f"{bench}: mean score by {view}, minus the corpus mean")]
            figures[f"marginal-{view}-{bench}"] = _bar_figure(out / f"marginal-{_slug(view)}-{_slug(bench)}.png", panel, 0.0)
    for frame, summary in contrasts:
        name = _contrast_name(summary)
        path = out / _slug(f"contrast-{summary['a']}-vs-{summary['b']}" + (f"-{summary['c']}-vs-{summary['d']}" if summary.get("c") else "") + ".png")
        titles = {"ab": f"{summary['a']} − {summary['b']}", **({"interaction": name} if "interaction" in frame else {})}
        if joint and joint in set(frame["view"]):
            panels, labels = [(c, f"{c}_excludes_0", t) for c, t in titles.items()], cmap.info["views"][joint]["columns"]
            figures[f"contrast-{name}"] = _grid_figure(path, frame[frame["view"] == joint], panels, 0.0, "standardised contrast", labels)
        else:  # no joint view: bars of the (first) view the contrast covers
            part, label = frame[frame["view"] == frame["view"].iloc[0]], "standardised contrast ± CI\ncoloured: CI excludes 0"
            panels = [(part, c, f"{c}_excludes_0", label, f"{t} by {part['view'].iloc[0]}") for c, t in titles.items()]
            figures[f"contrast-{name}"] = _bar_figure(path, panels, 0.0)
    return figures


def _get(d: dict, key: str) -> float:
    v = d.get(key) if isinstance(d, dict) else None
    return np.nan if v is None else float(v)


def unlearn_figure(result: dict, path: Path) -> Path | None:
    """Per metric: top − random change on the aligned and the control benchmark and their
    difference (the DiD), with the confidence intervals the experiment reports."""
    plt = pyplot()
    metrics = [m for m in ("logprob", "accuracy") if m in result.get("effect", {})]
    if not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.2), squeeze=False, layout="constrained")
    for ax, m in zip(axes[0], metrics):
        # top − random per benchmark: as reported (with an interval), else from the runs (without)
        gap = {b: result.get(f"{b}_drop", {}).get(m) or {"diff": _change(result, "top", b, m) - _change(result, "random", b, m)} for b in BENCHES}
        bars = [(gap["aligned"], "diff"), (gap["control"], "diff"), (result["effect"][m], "did")]
        v, lo, hi = (np.array([_get(d, k if c == "v" else c) for d, k in bars]) for c in ("v", "lo", "hi"))
        x = np.arange(len(bars))
        ax.bar(x, np.nan_to_num(v), color=["#8da0cb", "#8da0cb", HIGHLIGHT], width=0.6)
        ci = np.isfinite(lo) & np.isfinite(hi)
        ax.errorbar(x[ci], v[ci], yerr=np.clip(np.stack([v - lo, hi - v])[:, ci], 0, None), fmt="none", ecolor="black", capsize=4)
        for xi, vi in zip(x, v):  # the value beside each bar, so a zero-height bar still reads
            ax.text(xi + 0.33, np.nan_to_num(vi), _f(vi, ".2g"), va="center", fontsize=9, color="#333")
        ax.use_sticky_edges = False  # bars stick to 0 otherwise, and a label at 0 runs into the title
        ax.margins(x=0.12, y=0.12)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(x, ["aligned\ntop − random", "control\ntop − random", "DiD"], fontsize=9)
        ax.set_title(f"change in {m} after unlearning", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------ the page

CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:#222;margin:0;background:#fafafa}
main{max-width:1250px;margin:0 auto;padding:24px 32px 60px;background:#fff}
h1{font-size:26px;margin:0 0 6px} h3{font-size:17px;margin:26px 0 8px}
h2{font-size:21px;border-bottom:2px solid #eee;padding-bottom:4px;margin-top:40px}
nav{font-size:14px;margin:8px 0 18px} nav a{margin-right:14px;color:#2b5797;text-decoration:none}
table{border-collapse:collapse;font-size:13.5px;margin:8px 0 16px} th{background:#f3f3f3;font-weight:600}
th,td{border-bottom:1px solid #e4e4e4;padding:5px 9px;text-align:left;vertical-align:top} td:first-child{white-space:nowrap}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.sig td{background:#fff4e8} dl.kv{display:grid;grid-template-columns:max-content 1fr;gap:3px 18px;margin:0} dt{color:#666} dd{margin:0}
.figs{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start} figure{margin:0} img{max-width:100%;height:auto;border:1px solid #eee}
ol.ex{margin:0;padding-left:18px;font-size:12.5px;color:#444;max-width:460px} ol.ex code{color:#888} .note{color:#666;font-size:13.5px}
"""


def _table(header: list[str], rows: list[list[str]], classes: list[str] | None = None, numeric: set[int] = frozenset()) -> str:
    """An HTML table; cells are already escaped HTML."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join(
        f"<tr class='{c}'>" + "".join(f"<td class='num'>{v}</td>" if j in numeric else f"<td>{v}</td>" for j, v in enumerate(r)) + "</tr>"
        for r, c in zip(rows, classes or [""] * len(rows))
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(path: Path | None, alt: str) -> str:
    if path is None:
        return ""
    raw = Path(path).read_bytes()
    width = int.from_bytes(raw[16:20], "big")  # the PNG header's IHDR width
    data = base64.b64encode(raw).decode("ascii")
    return f"<figure><img src='data:image/png;base64,{data}' width='{round(0.8 * width)}' alt='{html.escape(alt, quote=True)}'></figure>"


def _examples(cmap: CorpusMap, view: str, bin_name: str, bench: str) -> str:
    docs = cmap.info.get("examples", {}).get(view, {}).get(bin_name, {}).get(bench, [])[:EXAMPLES]
    items = []
    for d in docs:
        text = str(d.get("text", ""))
        text = text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS].rstrip() + "…"
        items.append(f"<li><code>{html.escape(str(d.get('id', '')))} · {_f(d.get('score'))}</code> {html.escape(text)}</li>")
    return f"<ol class='ex'>{''.join(items)}</ol>" if items else ""


def top_bins(cmap: CorpusMap) -> pd.DataFrame:
    """Every bin with statistics, per benchmark from the highest z-score down."""
    t = cmap.table[~cmap.table["small"]]
    t = t.sort_values(["benchmark", "z"], ascending=[True, False], key=lambda s: s.map(cmap.benchmarks.index) if s.name == "benchmark" else s)
    keep = [
        "benchmark",
        "view",
        "bin",
        "n",
        "share",
        "mean",
        "lo",
        "hi",
        "excess",
        "excess_lo",
        "excess_hi",
        "z",
        "q",
        "enrichment",
        "top_k",
        "significant",
    ]
    return t[[c for c in keep if c in t]].reset_index(drop=True)


def _load_contrasts(map_dir: Path) -> list[tuple[pd.DataFrame, dict]]:
    out = []
    for js in sorted(map_dir.glob("contrast-*.json")):
        pq, csv = js.with_suffix(".parquet"), js.with_suffix(".csv")
        if pq.exists() or csv.exists():
            out.append((pd.read_parquet(pq) if pq.exists() else pd.read_csv(csv), json.loads(js.read_text())))
    return out


def _load_unlearn(path: str | Path) -> dict:
    """An unlearn.json, or a filter.json (`headwater filter`), with the path it came from."""
    path = Path(path)
    if path.is_dir():
        path = next((path / f for f in ("unlearn.json", "filter.json") if (path / f).exists()), path / "unlearn.json")
    if not path.exists():
        raise UserError(f"no unlearning or filtering result at {path} (expected an unlearn.json or filter.json)")
    return {**json.loads(path.read_text()), "_path": str(path)}


def _filter_section(result: dict) -> str:
    """A filtering check: each benchmark's change from the full run without the bin and without as
    many random records, and their difference with its interval."""
    e = html.escape
    head = " → ".join(str(result[k]) for k in ("bin", "benchmark") if k in result) + " (trained again without the bin)"
    rows = [
        [
            f"{result.get(f'{b}_benchmark' if b == 'control' else 'benchmark', b)} ({b})",
            m,
            _f(c["filtered"]),
            _f(c["random"]),
            _ci(c["diff"], c["lo"], c["hi"]),
        ]
        for b, per in result["change"].items()
        for m, c in per.items()
    ]
    table = _table(["benchmark", "metric", "Δ without the bin", "Δ without random records", "difference [CI]"], rows, numeric={2, 3, 4})
    facts = f"{e(result['_path'])} · {result.get('dropped', '?')} records, seeds {e(str(result.get('seeds')))}"
    return f"<h3>{e(head)}</h3><p class='note'>{facts}</p>{table}"


def _change(result: dict, arm: str, bench: str, metric: str | None = None) -> float:
    """Mean over the arm's seeds of after − before of `bench`'s `metric` (or of `bench` itself,
    retain_ppl); NaN where the result lacks either."""
    at = (lambda d: _get(d.get(bench), metric)) if metric else (lambda d: _get(d, bench))
    vals = [at(r) for r in result.get("runs", []) if r.get("arm") == arm]
    vals = [v for v in vals if np.isfinite(v)]
    return float(np.mean(vals) - at(result.get("before", {}))) if vals else np.nan


def unlearn_rows(result: dict) -> list[dict]:
    """One row per metric: each arm's change on the aligned and control benchmark and in retain
    perplexity, and the difference in differences with its interval."""
    rows = []
    for m in ("logprob", "accuracy"):
        row = {k: result.get(k) for k in ("bin", "benchmark", "control_benchmark") if k in result} | {"metric": m}
        row |= {f"{arm} {b}": _change(result, arm, b, m) for arm in ARMS for b in BENCHES}
        row |= {f"{arm} retain_ppl": _change(result, arm, "retain_ppl") for arm in ARMS}
        e = result.get("effect", {}).get(m, {})
        row |= {k: e.get(k, np.nan) for k in ("did", "lo", "hi")}
        if m in result.get("effect", {}) or np.isfinite([row[f"{arm} {b}"] for arm in ARMS for b in BENCHES]).any():
            rows.append(row)
    return rows


def _unlearn_section(result: dict, figure: Path | None) -> str:
    e = html.escape
    head = " → ".join(str(result[k]) for k in ("bin", "benchmark") if k in result) or Path(result["_path"]).parent.name
    facts = [f"{k.replace('_', ' ')}: {e(str(result[k]))}" for k in ("control_benchmark", "bin_size", "forget") if k in result]
    if isinstance(result.get("tokens"), dict) and "top" in result["tokens"]:
        facts.append(f"tokens forgotten per run: {e(str(result['tokens']['top']))}")
    before = result.get("before", {})
    facts += [f"before, {b}: " + ", ".join(f"{m} {_f(v)}" for m, v in d.items()) for b in BENCHES if isinstance(d := before.get(b), dict)]
    facts += [f"retain perplexity before: {_f(before['retain_ppl'])}"] if before.get("retain_ppl") is not None else []
    parts = [f"<h3>{e(head)}</h3><p class='note'>{e(result['_path'])}<br>{' · '.join(facts)}</p>"]
    rows = unlearn_rows(result)
    if rows:
        header = ["metric", *(f"Δ {b}, {arm}" for arm in ARMS for b in BENCHES), "Δ retain ppl, top"]
        header += ["Δ retain ppl, random", "DiD [CI]"]
        cells = [[r["metric"]] + [_f(v) for k, v in r.items() if k.startswith(("top ", "random "))] + [_ci(r["did"], r["lo"], r["hi"])] for r in rows]
        parts.append(_table(header, cells, numeric=set(range(1, len(header)))))
    parts.append(_img(figure, "unlearning effects"))
    parts += [f"<p class='note'>{e(str(n))}</p>" for n in result.get("notes", [])]
    return "\n".join(parts)


def _summary(cmap: CorpusMap, top: pd.DataFrame) -> str:
    info, cfg, fdr = cmap.info, cmap.info["config"], _fdr(cmap)
    meas = info.get("measurement", {})
    above = {b: int((top["benchmark"].eq(b) & top["significant"] & top["z"].gt(0)).sum()) for b in cmap.benchmarks}
    facts = {
        "method": info.get("method", "–"),
        "measurement": f"{meas.get('name', '')} ({meas.get('direction', '')})" if isinstance(meas, dict) else meas,
        "records": f"{info.get('n_records', 0):,}",
        "benchmarks": "; ".join(
            f"{b} ({len(v.get('queries', []))} items, {above[b]} bins above the corpus mean)" for b, v in info["benchmarks"].items()
        ),
        "views": "; ".join(f"{v} ({len(s['bins'])} bins)" for v, s in info["views"].items()),
        "label source": json.dumps(info["labels"], default=str)[:300] if info.get("labels") else "–",
        "statistics": f"{cfg.get('bootstrap')} bootstrap replicates, {cfg.get('confidence', 0.95):.0%} intervals, bins under "
        f"{cfg.get('min_bin_size')} records left out, significant: Benjamini–Hochberg q < {fdr:g}",
    }
    return "<h2 id='summary'>Summary</h2><dl class='kv'>" + "".join(f"<dt>{k}</dt><dd>{html.escape(str(v))}</dd>" for k, v in facts.items()) + "</dl>"


def _top_section(cmap: CorpusMap, top: pd.DataFrame, bench: str) -> str:
    rows, e = top[top["benchmark"] == bench].head(TOP_N), html.escape
    header = ["view", "bin", "n", "mean [CI]", "z", "q", "enrichment", "sig.", "top documents (id · score)"]
    cells = [
        [e(r.view), e(r.bin), f"{r.n:,}", _ci(r.mean, r.lo, r.hi), _f(r.z, ".2f"), _f(r.q, ".2g"), _f(r.enrichment, ".2f")]
        + ["✓" if r.significant else "", _examples(cmap, r.view, r.bin, bench)]
        for r in rows.itertuples()
    ]
    return f"<h3>{e(bench)}</h3>" + _table(header, cells, ["sig" if s else "" for s in rows["significant"]], numeric={2, 3, 4, 5, 6})


def _contrast_section(frame: pd.DataFrame, summary: dict, figure: Path | None) -> str:
    name, e = _contrast_name(summary), html.escape
    labels = {"ab": f"{summary['a']} − {summary['b']}", "cd": f"{summary.get('c')} − {summary.get('d')}", "interaction": "interaction"}
    stats = [c for c in labels if c in frame]
    sig = frame[np.logical_or.reduce([frame[f"{c}_excludes_0"].astype(bool) for c in stats])].sort_values(stats[-1], ascending=False)
    cells = [[e(r["view"]), e(r["bin"]), f"{r['n']:,}"] + [_ci(r[c], r[f"{c}_lo"], r[f"{c}_hi"]) for c in stats] for _, r in sig.iterrows()]
    header = ["view", "bin", "n"] + [f"{e(labels[c])} [CI]" for c in stats]
    table = _table(header, cells, numeric=set(range(2, len(header)))) if cells else "<p>none</p>"
    parts = [f"<h3>{e(name)}</h3>", _img(figure, name), f"<p class='note'>Bins whose interval excludes 0:</p>{table}"]
    keys = {"corr_ab": "corr(A, B)", "corr_cd": "corr(C, D)", "sharper_ab_than_cd": "corr(C, D) − corr(A, B)"}
    views = summary.get("views", {})
    keys = {k: v for k, v in keys.items() if any(k in s for s in views.values())}
    corr = [[e(v)] + [_ci(s[k]["value"], s[k]["lo"], s[k]["hi"]) if k in s else "–" for k in keys] for v, s in views.items()]
    parts += [
        "<p class='note'>Correlation of the benchmarks' standardised bin profiles:</p>",
        _table(["view", *keys.values()], corr, numeric={1, 2, 3}),
    ]
    return "\n".join(parts)


LEGEND = "Colour: a bin's mean score (red above, blue below the corpus mean); ★ and a bold border: significant; hatched grey: too few records."
UNLEARN_NOTE = (
    "Changes are after − before, averaged over seeds; a DiD interval below 0 means forgetting the bin's top records hurt the aligned "
    "benchmark more than forgetting as many random records of the bin, beyond the control benchmark."
)


def write_report(map_dir: str | Path, out: str | Path, unlearn_dirs: list[str | Path] = (), title: str | None = None) -> Path:
    """One self-contained HTML page `out` (figures inlined), the PNGs in `<out stem>_files/`, the
    top-bins table as `<out stem>-top-bins.csv` (and the unlearning one as `-unlearning.csv`)
    beside it. `unlearn_dirs`: directories holding an `unlearn.json` (or the files). Returns `out`."""
    map_dir, out = Path(map_dir), Path(out)
    cmap, contrasts = CorpusMap.load(map_dir), _load_contrasts(map_dir)
    results = [_load_unlearn(d) for d in unlearn_dirs]
    files = out.parent / f"{out.stem}_files"
    figures = write_figures(cmap, files, contrasts)
    unlearn_figs = [None if "change" in r else unlearn_figure(r, files / f"unlearn-{k}.png") for k, r in enumerate(results)]
    top = top_bins(cmap)
    top.to_csv(out.parent / f"{out.stem}-top-bins.csv", index=False)
    if results:
        rows = [{"result": r["_path"], **row} for r in results if "change" not in r for row in unlearn_rows(r)]
        pd.DataFrame(rows).to_csv(out.parent / f"{out.stem}-unlearning.csv", index=False)
    e, joint = html.escape, _joint(cmap)
    title = title or f"Corpus map: {', '.join(cmap.benchmarks)}"
    sections = ["summary", *(["heatmaps", "marginals"] if joint else ["bin means"]), "top bins"]
    sections += ["contrasts"] * bool(contrasts) + ["unlearning"] * bool(results)
    body = [f"<h1>{e(title)}</h1><nav>" + "".join(f"<a href='#{_slug(s)}'>{s}</a>" for s in sections) + "</nav>", _summary(cmap, top)]

    marginals = {b: [_img(figures[k], k) for v in cmap.views if (k := f"marginal-{v}-{b}") in figures] for b in cmap.benchmarks}
    if joint:
        body += ["<h2 id='heatmaps'>Heatmaps</h2>", f"<p class='note'>{LEGEND}</p><div class='figs'>"]
        body += [_img(figures[f"joint-{b}"], f"{b} heatmap") for b in cmap.benchmarks] + ["</div>", "<h2 id='marginals'>Marginals</h2>"]
        body += [f"<h3>{e(b)}</h3><div class='figs'>{''.join(figs)}</div>" for b, figs in marginals.items()]
    else:  # one label column: its bar charts are the main figures, side by side
        body += ["<h2 id='bin-means'>Bin means</h2><div class='figs'>", *(f for figs in marginals.values() for f in figs), "</div>"]
    csv = e(f"{out.stem}-top-bins.csv")
    body.append(f"<h2 id='top-bins'>Top bins</h2><p class='note'>Per benchmark the {TOP_N} bins with the highest z; all bins are in {csv}.</p>")
    body += [_top_section(cmap, top, b) for b in cmap.benchmarks]
    if contrasts:
        body.append("<h2 id='contrasts'>Contrasts</h2><p class='note'>On standardised bin profiles: A − B > 0 where a bin stands out more for A.</p>")
    body += [_contrast_section(f, s, figures.get(f"contrast-{_contrast_name(s)}")) for f, s in contrasts]
    if results:
        body.append(f"<h2 id='unlearning'>Unlearning</h2><p class='note'>{UNLEARN_NOTE}</p>")
    body += [_filter_section(r) if "change" in r else _unlearn_section(r, f) for r, f in zip(results, unlearn_figs)]
    head = f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title><style>{CSS}</style></head>"
    out.write_text(head + "<body><main>\n" + "\n".join(body) + "\n</main></body></html>\n", encoding="utf-8")
    return out
