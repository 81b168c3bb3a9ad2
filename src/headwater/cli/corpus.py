"""Corpus commands: `label` (attach record labels to an index), `bins` (the corpus map),
`contrast` (benchmarks against each other on a map), `unlearn` (the causal check of a bin),
`filter` (train again without a bin), `report` (figures and one HTML page)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..config import GradientConfig, InfluenceConfig, TrackStarConfig, TrainConfig
from ..corpus.bins import BinsConfig
from ..corpus.config import FilterConfig, LabelConfig, MapInputConfig, UnlearnTargetConfig
from ..corpus.unlearn import UnlearnConfig
from ..errors import UserError
from .app import app
from .index import DEVICE_OVERRIDE, MODEL_OVERRIDE, PROGRESS, open_index
from .options import command, save_configs


@command(app, LabelConfig)
def label(index: Path = typer.Argument(..., help="Index directory to attach the labels to."), progress: bool = PROGRESS, configs: dict = None):
    """Attach record labels (topic, format, source, ...) to an index, joined by record id, from a
    table, from columns of the data, or from a sequence classifier; recorded in its manifest."""
    from ..corpus.labels import attach_labels, classify_records, describe, labels_from_columns, labels_from_file, merge_labels
    from ..index import Index

    c = configs[LabelConfig]
    idx = Index(index)
    parts = []
    if c.labels:
        parts.append(labels_from_file(c.labels, idx.train_ids, c.id_column))
    if c.columns:
        parts.append(labels_from_columns(idx.records, [x.strip() for col in c.columns for x in col.split(",") if x.strip()]))
    if c.classifier:
        parts.append(classify_records(idx.records, c.classifier, c.column, c.classifier_batch_size, c.device, progress=progress))
    if not parts:
        raise UserError("give the labels: --labels FILE, --columns NAMES or --classifier MODEL")
    labels = merge_labels(*parts) if len(parts) > 1 else parts[0]
    path = attach_labels(idx, labels)
    save_configs(path, c)
    typer.echo(f"labelled {describe(labels)}; wrote {path}")


@command(app, MapInputConfig, BinsConfig, GradientConfig, TrackStarConfig, InfluenceConfig)
def bins(
    index: Path = typer.Argument(..., help="Index directory with labels attached (`headwater label`)."),
    out: Path = typer.Option(..., "--out", help="Directory for the corpus map (bins.parquet/.csv, map.json, arrays)."),
    model: str | None = MODEL_OVERRIDE,
    device: str | None = DEVICE_OVERRIDE,
    progress: bool = PROGRESS,
    configs: dict = None,
):
    """Score every indexed record for every benchmark item in one pass over the store and
    aggregate per label bin: means with bootstrap intervals, totals, top-k enrichment, z-scores
    against the permutation null and Benjamini–Hochberg q-values."""
    from ..concepts.vector import resolve_measurement
    from ..corpus.bins import checked_views, corpus_map
    from ..corpus.labels import load_labels
    from ..data import load_records
    from ..methods import METHODS

    m = configs[MapInputConfig]
    if m.measurement == "concept-rate":
        raise UserError("--measurement concept-rate samples responses per query: use `headwater attribute`")
    benchmarks = m.benchmarks()
    for path in benchmarks.values():
        load_records(path)  # a bad benchmark file fails before any gradient is computed
    idx = open_index(index, model, device)
    labels = load_labels(idx)
    checked_views(labels, configs[BinsConfig], list(benchmarks), m.contrasts())  # fails before any fit
    cls = METHODS[m.method]
    method_config = configs[cls.config_class]
    method = cls(None, None, method_config).fit(idx, progress=progress)
    cmap = corpus_map(method, benchmarks, labels, configs[BinsConfig], resolve_measurement(m.measurement, m.probe), m.contrasts(), progress)
    cmap.save(out)
    save_configs(out / "bins", m, configs[BinsConfig], method_config)
    sig = cmap.table[cmap.table["significant"]]
    typer.echo(f"wrote the corpus map of {cmap.info['n_records']} records × {len(cmap.benchmarks)} benchmarks to {out}")
    for b in cmap.benchmarks:
        best = sig[sig["benchmark"] == b].sort_values("z", ascending=False).head(5)
        shown = ", ".join(f"{r.view}={r.bin} (z {r.z:+.1f}, q {r.q:.2g})" for r in best.itertuples())
        typer.echo(f"  {b}: {len(sig[sig['benchmark'] == b])} significant bins" + (f"; strongest: {shown}" if shown else ""))


@command(app, name="contrast")
def contrast_command(
    map_dir: Path = typer.Argument(..., help="A corpus map directory (`headwater bins --out`)."),
    a: str = typer.Option(..., "--a", help="Benchmark A."),
    b: str = typer.Option(..., "--b", help="Benchmark B (A − B per bin)."),
    c: str | None = typer.Option(None, "--c", help="Benchmark C of a 2×2 design (with --d: the interaction (A − B) − (C − D))."),
    d: str | None = typer.Option(None, "--d", help="Benchmark D of a 2×2 design."),
    view: str | None = typer.Option(None, "--view", help="One view of the map (a label column, or the joint one); default: all."),
):
    """Contrast benchmarks per bin on standardised profiles, with paired bootstrap intervals."""
    from ..corpus.bins import CorpusMap
    from ..corpus.contrast import contrast, save_contrast

    frame, summary = contrast(CorpusMap.load(map_dir), a, b, c, d, view)
    path = save_contrast(map_dir, frame, summary)
    key = "interaction" if c else "ab"
    typer.echo(f"wrote {path}")
    for v, s in summary["views"].items():
        typer.echo(f"  {v}: " + "; ".join(f"{k} {x['value']:+.2f} [{x['lo']:+.2f}, {x['hi']:+.2f}]" for k, x in s.items()))
        sel = frame[(frame["view"] == v) & frame[f"{key}_excludes_0"]].sort_values(key, ascending=False)
        if len(sel):
            typer.echo("    bins whose interval excludes 0: " + ", ".join(f"{r.bin} ({getattr(r, key):+.2f})" for r in sel.head(8).itertuples()))


@command(app, UnlearnTargetConfig, UnlearnConfig)
def unlearn(
    index: Path = typer.Argument(..., help="Index directory with labels attached: its records are the corpus."),
    out: Path = typer.Option(..., "--out", help="Directory for the result (unlearn.json)."),
    model: str | None = MODEL_OVERRIDE,
    device: str | None = DEVICE_OVERRIDE,
    progress: bool = PROGRESS,
    configs: dict = None,
):
    """Causal check of a map: forget a bin's top records for a benchmark versus as many random
    records of the same bin, over seeds; report the aligned and control benchmarks' changes and
    the difference-in-differences with a paired bootstrap interval."""
    import json

    from ..corpus.unlearn import unlearning_experiment

    t, cfg = configs[UnlearnTargetConfig], configs[UnlearnConfig]
    idx = open_index(index, model, device)
    cmap, view, bin_name, members, (aligned_name, aligned), (control_name, control) = _target(t, idx)
    scores = cmap.record_scores[:, cmap.benchmarks.index(aligned_name)]
    result = unlearning_experiment(idx.model(), idx.task().tokenizer, idx.records, members, scores, list(aligned), list(control), cfg, progress)
    result.update(bin=f"{view}={bin_name}", benchmark=aligned_name, control_benchmark=control_name, map=str(Path(t.map).resolve()))
    out.mkdir(parents=True, exist_ok=True)
    (out / "unlearn.json").write_text(json.dumps(result, indent=1))
    save_configs(out / "unlearn", t, cfg)
    a, e = result["aligned_drop"]["logprob"], result["effect"]["logprob"]
    typer.echo(f"wrote {out / 'unlearn.json'}: forgetting the top {result['forget']} records of {view}={bin_name} for {aligned_name}")
    typer.echo(f"  {aligned_name} gold log-prob, top − random: {a['diff']:+.3f} [{a['lo']:+.3f}, {a['hi']:+.3f}]")
    typer.echo(f"  difference-in-differences (minus {control_name}'s): {e['did']:+.3f} [{e['lo']:+.3f}, {e['hi']:+.3f}]")
    for note in result["notes"]:
        typer.echo(f"  note: {note}")


def _target(t: UnlearnTargetConfig, idx):
    """(map, view, bin, the bin's record indices, (aligned name, items), (control name, items)) of an
    unlearn or filter command, checked against the index and labels the map was made from."""
    from ..corpus.bins import CorpusMap
    from ..data import load_records

    if not t.map:
        raise UserError("give the corpus map the bin comes from (--map)")
    cmap = CorpusMap.load(t.map)
    if cmap.record_scores is None:
        raise UserError(f"{t.map} has no record scores (record_scores.safetensors); make the map again with `headwater bins`")
    view, bin_name = t.view_and_bin(cmap.info["config"]["by"] or list(cmap.info["views"]))
    if len(t.benchmark or []) != 1 or not t.control:
        raise UserError("give one --benchmark (the aligned one, a name of the map) and a --control")

    def items(spec: str):
        name, sep, path = spec.partition("=")
        if sep:
            return name, list(load_records(path))
        if name not in cmap.benchmarks or not cmap.info["benchmarks"][name].get("source"):
            raise UserError(f"benchmark {name!r} is not a file-backed benchmark of the map; give it as {name}=FILE")
        return name, list(load_records(cmap.info["benchmarks"][name]["source"]))

    aligned, control = items(t.benchmark[0]), items(t.control)
    if aligned[0] not in cmap.benchmarks:
        raise UserError(f"benchmark {aligned[0]!r} is not in the map (it has {', '.join(cmap.benchmarks)})")
    if idx.n_records != cmap.info["n_records"]:
        raise UserError(f"the map covers {cmap.info['n_records']} records, the index {idx.n_records}: use the index the map was made from")
    from ..corpus.bins import bin_members
    from ..corpus.labels import load_labels

    labels = load_labels(idx)
    made_with = cmap.info["labels"].get("fingerprint")
    if made_with is not None and made_with != labels.fingerprint():
        raise UserError("the index's labels changed since the map was made; make the map again (`headwater bins`)")
    return cmap, view, bin_name, bin_members(labels, cmap, view, bin_name), aligned, control


@command(app, UnlearnTargetConfig, FilterConfig, TrainConfig, name="filter")
def filter_command(
    index: Path = typer.Argument(..., help="Index directory with labels attached: its records are the training data."),
    out: Path = typer.Option(..., "--out", help="Directory for the result (filter.json)."),
    device: str | None = DEVICE_OVERRIDE,
    progress: bool = PROGRESS,
    configs: dict = None,
):
    """Data-filtering check of a map: train again from --init-model with the bin's records' losses
    zeroed, against as many random records zeroed and against the full data (same steps and data
    order); the aligned and control benchmarks' changes with paired bootstrap intervals."""
    import json

    from ..corpus.filtering import filtering_experiment
    from ..models import load_model

    t, f, train = configs[UnlearnTargetConfig], configs[FilterConfig], configs[TrainConfig]
    if not f.init_model:
        raise UserError("give the model the training run started from (--init-model)")
    idx = open_index(index)
    cmap, view, bin_name, drop, (aligned_name, aligned), (control_name, control) = _target(t, idx)
    init, tokenizer = load_model(f.init_model, device or idx.config.device, idx.config.model_dtype)
    result = filtering_experiment(init, tokenizer, idx.records, drop, train, aligned, control, f.filter_seeds, progress=progress)
    result.update(bin=f"{view}={bin_name}", benchmark=aligned_name, control_benchmark=control_name)
    out.mkdir(parents=True, exist_ok=True)
    (out / "filter.json").write_text(json.dumps(result, indent=1))
    save_configs(out / "filter", t, f, train)
    for b, name in (("aligned", aligned_name), ("control", control_name)):
        c = result["change"][b]["logprob"]
        diff = f"{c['diff']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}]"
        typer.echo(
            f"  {name}: gold log-prob {c['filtered']:+.3f} without {view}={bin_name}, {c['random']:+.3f} without random records; difference {diff}"
        )
    typer.echo(f"wrote {out / 'filter.json'}")


@command(app, name="report")
def report_command(
    map_dir: Path = typer.Argument(..., help="A corpus map directory (`headwater bins --out`), with any contrasts made on it."),
    unlearn_dirs: list[Path] = typer.Argument(
        None, help="Unlearning or filtering results to include (`headwater unlearn --out`, `headwater filter --out`)."
    ),
    out: Path = typer.Option(..., "--out", help="The HTML page to write (figures are embedded; PNGs and CSVs go beside it)."),
    title: str | None = typer.Option(None, "--title", help="Title of the page."),
):
    """Write the corpus map, its contrasts and unlearning or filtering results as PNGs and one self-contained HTML page."""
    from ..corpus.report import write_report

    path = write_report(map_dir, out, unlearn_dirs or [], title)
    typer.echo(f"wrote {path}")
